"""The prompts of the recipe, and the filter that drops prompts too long for the model.

Every row the loaders produce has ``prompt = [system message, user message]``. The system message
asks for the XML format the format rewards check; the user message is built from the source row:

- GSM8K: the question as it is.
- PubMedQA: ``"Given the scientific context below:\\n" + "\\n".join(contexts) +
  "\\n\\nAnswer the following question:\\n" + question + " with 'yes', 'no' or 'maybe'. ..."``
- Health_Benchmarks: ``"\\n\\nAnswer the following question:\\n" + question (options inside) +
  "\\n With 'A', 'B', 'C' or 'D'. ..."``

The strings are the recipe's, character for character (including its stray spaces and blank lines),
so results can be compared with it. docs/DATA.md quotes them.
"""

from __future__ import annotations

from collections.abc import Sequence

SYSTEM_PROMPT = (
    "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
)

PUBMEDQA_PREFIX = "Given the scientific context below:\n"
QUESTION_HEADER = "\n\nAnswer the following question:\n"
PUBMEDQA_INSTRUCTION = (
    " with 'yes', 'no' or 'maybe'. You need to carefully review the context and reason before answering."
)
MULTIPLE_CHOICE_INSTRUCTION = (
    "\n With 'A', 'B', 'C' or 'D'. You need to carefully review the context and reason before answering."
)


def make_prompt(user_content: str) -> list[dict[str, str]]:
    """The chat messages of one prompt: the system prompt, then the user message."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_content}]


def gsm8k_user_prompt(question: str) -> str:
    """GSM8K: the question as it is."""
    return question


def pubmedqa_user_prompt(contexts: Sequence[str], question: str) -> str:
    """PubMedQA: the abstract's context passages, one per line, then the question and the instruction.

    >>> pubmedqa_user_prompt(["Mice ran.", "They slept."], "Do mice run?")[:48]
    'Given the scientific context below:\\nMice ran.\\nTh'
    """
    return PUBMEDQA_PREFIX + "\n".join(contexts) + QUESTION_HEADER + question + PUBMEDQA_INSTRUCTION


def health_benchmarks_user_prompt(question: str) -> str:
    """Health_Benchmarks: the question (its four options are written inside it) and the instruction."""
    return QUESTION_HEADER + question + MULTIPLE_CHOICE_INSTRUCTION


# ---------------------------------------------------------------------------- prompt length


def prompt_lengths(prompts: Sequence[list[dict]], tokenizer, batch_size: int = 1000) -> list[int]:
    """Number of tokens of each prompt as the model sees it: chat template + generation prompt.

    The template is rendered to text and then tokenized (``add_special_tokens=False``: the template
    already holds them), which is what the samplers do. ``apply_chat_template(tokenize=True)`` is not
    used because its return type changed across transformers versions.
    """
    lengths: list[int] = []
    for start in range(0, len(prompts), batch_size):
        texts = [
            tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True)
            for p in prompts[start : start + batch_size]
        ]
        lengths.extend(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return lengths


def filter_long_prompts(dataset, tokenizer, max_prompt_length: int):
    """Drop the rows whose prompt is longer than ``max_prompt_length`` tokens (chat template included).

    Returns ``(kept: datasets.Dataset, n_dropped: int)``. Dropping (rather than truncating) keeps every
    question whole: a cut-off question has no right answer. Example: with prompts of 12, 30 and 31
    tokens and ``max_prompt_length=30``, the third row is dropped and ``n_dropped == 1``.
    """
    if max_prompt_length <= 0:
        raise ValueError(f"max_prompt_length={max_prompt_length}: must be > 0")
    lengths = prompt_lengths(dataset["prompt"], tokenizer)
    keep = [i for i, n in enumerate(lengths) if n <= max_prompt_length]
    n_dropped = len(lengths) - len(keep)
    if n_dropped == 0:
        return dataset, 0
    return dataset.select(keep), n_dropped
