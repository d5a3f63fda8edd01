"""DeepSeek-R1's cold start for a real model: a short supervised pass on real training rows in the recipe's format.

Why: GRPO learns only from differences between the completions of a group. Given the recipe's system prompt,
SmolLM2-135M-Instruct writes fluent prose and never the ``<reasoning>``/``<answer>`` tags, so every completion
earns 0 on all five rewards, every group ties, and GRPO gets no gradient at all (the tiny model needed its
warm start for the same reason, ``models/tiny/warm_start.py``). DeepSeek-R1 starts its RL from a model
fine-tuned on a few thousand long chain-of-thought examples ("cold start"); here the examples are the real
training rows of data/real/, written in the layout the format rewards check:

    <reasoning>
    {PubMedQA: the row's long_answer (the abstract's conclusion) | GSM8K: the worked solution}
    </reasoning>
    <answer>
    {PubMedQA: final_decision (yes / no / maybe) | GSM8K: the number after ####}
    </answer>

The GSM8K solution loses its ``#### <number>`` line (the number goes in <answer>) and its calculator
annotations (``<<48/2=24>>``, markup for OpenAI's calculator, not prose). The loss is on the target only
(prompt tokens are labelled -100), the target ending with the chat template's end-of-turn token.

What is trained: a LoRA on the seven projections of the full-precision model, which is then merged into the
weights and saved as a plain model folder. That folder is what GRPO starts from (``model_name_or_path``): it
loads it in 4-bit under a fresh LoRA, and its reference (the adapter switched off) is the cold-started model,
as in DeepSeek-R1, where the RL stage starts from, and is regularised towards, the fine-tuned checkpoint.

Never a test row: the rows come through the loaders' own ``parse_row`` for the ``train`` split (PubMedQA's
refuses every official test pubid), and ``check_no_test_rows`` then refuses any row whose user message is
also a test prompt of the same source (``ColdStartError``).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from data import gsm8k, pubmedqa
from data.common import DataError, SkipRow, load_hub, read_local_files, resolve_data_files
from data.prompts import make_prompt, prompt_lengths

SOURCES = ("pubmedqa", "gsm8k")
CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


class ColdStartError(ValueError):
    """A cold start that must not run (a test row among the training rows, no row left); names the source."""


@dataclass(frozen=True)
class ColdStartSettings:
    """The supervised pass. The defaults are the run measured on SmolLM2-135M-Instruct (2-core CPU): 60 steps of
    4 PubMedQA rows, LoRA r 16, lr 3e-4, fp32, took 11 minutes and gave the strict format on 40 of 40 official
    test questions (from 0 of 40)."""

    steps: int = 80
    batch_size: int = 4  # rows per step
    learning_rate: float = 3e-4
    lora_r: int = 16
    lora_alpha: int = 32
    seed: int = 0
    max_grad_norm: float = 1.0
    max_context_chars: int = (
        10**6
    )  # PubMedQA rows kept whatever their context length (max_prompt_length decides)
    pubmedqa_share: float = 0.5  # share of PubMedQA rows in each step's batch, on average; the rest GSM8K


# ---------------------------------------------------------------------------- targets


def gsm8k_reasoning(solution: str) -> str:
    """A GSM8K worked solution without its ``#### <number>`` line and its calculator annotations.

    >>> gsm8k_reasoning("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\\n#### 72")
    'Natalia sold 48/2 = 24 clips in May.'
    """
    body = solution.rsplit("####", 1)[0]
    return CALCULATOR_ANNOTATION.sub("", body).strip()


def formatted_target(reasoning: str, answer: str) -> str:
    """The recipe's layout around a reasoning text and an answer (what strict_format_reward_func checks).

    >>> formatted_target("It does.", "yes")
    '<reasoning>\\nIt does.\\n</reasoning>\\n<answer>\\nyes\\n</answer>\\n'
    """
    return f"<reasoning>\n{reasoning.strip()}\n</reasoning>\n<answer>\n{answer}\n</answer>\n"


# ---------------------------------------------------------------------------- rows


def raw_rows(source: str, split: str, data_files: Optional[Any]) -> Iterable[dict]:
    """The raw hub-schema rows of one split (local files when ``data_files`` is set, else the hub)."""
    if data_files is not None:
        return read_local_files(resolve_data_files(data_files, split, source=source), source=source)
    if source == "pubmedqa":
        return load_hub(source, pubmedqa.REPO, pubmedqa.CONFIGS[split], split="train")
    return load_hub(source, gsm8k.REPO, gsm8k.CONFIG, split=split)


def training_rows(source: str, data_files: Optional[Any], max_context_chars: int) -> list[dict]:
    """``{prompt, answer, db_set, target}`` for every usable training row of ``source``.

    Each raw row goes through the loader's own ``parse_row`` for the train split (same prompt, same gold
    answer, PubMedQA's test-pubid guard); rows it skips or rejects are left out here too.
    """
    if source == "pubmedqa":
        parse = functools.partial(
            pubmedqa.parse_row,
            split="train",
            max_context_chars=max_context_chars,
            test_pubids=pubmedqa.official_test_pubids(),
        )
    elif source == "gsm8k":
        parse = gsm8k.parse_row
    else:
        raise ColdStartError(f"cold start: unknown source {source!r}; known: {', '.join(SOURCES)}")
    rows = []
    for raw in raw_rows(source, "train", data_files):
        try:
            user, answer = parse(raw)
        except SkipRow:  # BadRow too: the loader would have left it out
            continue
        if source == "pubmedqa":
            if int(raw["pubid"]) in pubmedqa.official_test_pubids():  # parse_row refused these already
                raise ColdStartError(f"pubmedqa: official test pubid {raw['pubid']} among the training rows")
            reasoning = raw.get("long_answer") or ""
        else:
            reasoning = gsm8k_reasoning(raw["answer"])
        if not reasoning.strip():
            continue
        rows.append(
            {
                "prompt": make_prompt(user),
                "answer": answer,
                "db_set": source,
                "target": formatted_target(reasoning, answer),
            }
        )
    return rows


def evaluation_messages(source: str, data_files: Optional[Any]) -> set[str]:
    """The user messages of the source's evaluation split (PubMedQA: the 500 official test questions)."""
    module = pubmedqa if source == "pubmedqa" else gsm8k
    try:
        test = module.load("test", data_files)
    except DataError:
        if data_files is None:  # no hub: nothing to compare with here, and the loaders' guards still hold
            return set()
        raise
    return {prompt[-1]["content"] for prompt in test["prompt"]}


def check_no_test_rows(rows: Sequence[dict], messages: set[str], source: str) -> None:
    """ColdStartError when a training row's user message is also a test prompt of its source."""
    leaked = [row for row in rows if row["prompt"][-1]["content"] in messages]
    if leaked:
        raise ColdStartError(
            f"{source}: {len(leaked)} cold-start row(s) are test questions "
            f"(e.g. {leaked[0]['prompt'][-1]['content'][:80]!r}): check {source}_data_files"
        )


def cold_start_rows(
    config: Any, tokenizer: Any, max_context_chars: int = ColdStartSettings.max_context_chars
) -> dict[str, list[dict]]:
    """``{source: rows}`` of the cold start: the training rows of PubMedQA and GSM8K, with their targets,
    no test question among them, prompts longer than ``max_prompt_length`` tokens left out.

    config: uses pubmedqa_data_files, gsm8k_data_files, max_prompt_length.
    """
    out = {}
    for source in SOURCES:
        data_files = getattr(config, f"{source}_data_files")
        rows = training_rows(source, data_files, max_context_chars)
        check_no_test_rows(rows, evaluation_messages(source, data_files), source)
        lengths = prompt_lengths([row["prompt"] for row in rows], tokenizer)
        rows = [row for row, n in zip(rows, lengths, strict=True) if n <= config.max_prompt_length]
        if not rows:
            raise ColdStartError(f"{source}: no training row left for the cold start (max_prompt_length?)")
        out[source] = rows
    return out


# ---------------------------------------------------------------------------- the supervised pass


def supervised_batch(tokenizer: Any, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Right-padded ``[prompt | target <end of turn>]`` rows; labels are -100 except on the target.

    Returns input_ids, attention_mask, labels: each [B, L], L the longest row. The prompt is the chat
    template with the generation prompt (``<|im_start|>assistant\\n``), exactly what the samplers feed.
    """
    sequences, labels = [], []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(row["target"], add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        sequences.append(prompt_ids + target_ids)
        labels.append([-100] * len(prompt_ids) + target_ids)
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


def draw_batch(
    rng: random.Random, rows: dict[str, list[dict]], batch_size: int, pubmedqa_share: float
) -> list:
    """``batch_size`` rows: each from PubMedQA with probability ``pubmedqa_share``, else GSM8K, uniformly
    within its source (a source that is absent is never drawn)."""
    names = [s for s in SOURCES if rows.get(s)]
    weights = [pubmedqa_share if s == "pubmedqa" else 1.0 - pubmedqa_share for s in names]
    return [rng.choice(rows[rng.choices(names, weights)[0]]) for _ in range(batch_size)]


def supervised_cold_start(
    model: Any, tokenizer: Any, rows: dict[str, list[dict]], settings: ColdStartSettings, log=None
) -> list[float]:
    """Train a LoRA of ``settings`` on ``model`` (full precision, frozen base) and merge it in; returns the
    per-step losses (mean cross-entropy over the target tokens of the step's rows).

    ``model`` is changed in place and returned merged by the caller with ``merge_and_unload`` (see
    ``run_cold_start``). Deterministic for a seed.
    """
    rng = random.Random(settings.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(settings.steps):
        batch = supervised_batch(
            tokenizer, draw_batch(rng, rows, settings.batch_size, settings.pubmedqa_share)
        )
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log is not None:
            log(f"cold start step {step + 1}/{settings.steps}: loss {losses[-1]:.3f}")
    model.eval()
    return losses


def run_cold_start(
    config: Any, base: str, output_dir: str, settings: ColdStartSettings, log=None
) -> dict[str, Any]:
    """Load ``base`` in float32, train the cold start's LoRA on ``cold_start_rows``, merge it, and save a plain
    model folder (weights, tokenizer, chat template) at ``output_dir``. Returns what was done (for a JSON)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from models.policy import load_tokenizer, resolve_model_path

    path = resolve_model_path(base)
    tokenizer = load_tokenizer(path, config.trust_remote_code, name=base)
    rows = cold_start_rows(config, tokenizer, settings.max_context_chars)
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.requires_grad_(False)
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(config.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    losses = supervised_cold_start(model, tokenizer, rows, settings, log=log)
    merged = model.merge_and_unload()
    merged.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return {
        "base": base,
        "settings": asdict(settings),
        "rows": {source: len(r) for source, r in rows.items()},
        "data_files": {source: getattr(config, f"{source}_data_files") for source in SOURCES},
        "max_prompt_length": config.max_prompt_length,
        "losses": losses,
    }
