"""A short supervised warm start ("cold start") for the tiny model, so GRPO has something to work with.

A random model writes noise: every completion earns reward 0, every group has zero variance, and
GRPO gets no gradient at all. Qwen2.5-3B-Instruct does not have this problem because it was
instruction-tuned before we start. The tiny model gets the same head start in miniature, like
DeepSeek-R1's cold start: a few supervised steps on formatted examples of the training prompts,

    <reasoning>
    {one short sentence}
    </reasoning>
    <answer>
    {gold answer}
    </answer>

trained into the full (16-bit) weights before the model is saved. The result is the *base* that
``load_policy`` then loads in 4-bit under a fresh LoRA, and GRPO's reference is this base. It is
deliberately short (``WARM_START_STEPS``): the model comes out of it knowing roughly what the answer
format looks like and right sometimes, and GRPO has to do the rest.
"""

from __future__ import annotations

import random

import torch

from models.cold_start import supervised_batch

WARM_START_STEPS = 60
WARM_START_BATCH = 16
WARM_START_LR = 3e-3
WARM_START_SEED = 0

REASONING = {
    "gsm8k": "I work out the number from the question.",
    "pubmedqa": "I weigh what the context reports.",
    "med_mc": "I compare the four options.",
}


def formatted_completion(answer: str, db_set: str) -> str:
    """The target text for one row: the recipe's XML layout around the gold answer.

    Example: ("yes", "pubmedqa") -> "<reasoning>\\nI weigh what the context reports.\\n</reasoning>\\n"
    "<answer>\\nyes\\n</answer>\\n".
    """
    return f"<reasoning>\n{REASONING.get(db_set, 'I think.')}\n</reasoning>\n<answer>\n{answer}\n</answer>\n"


def supervised_warm_start(
    model,
    tokenizer,
    rows: list[dict],
    steps: int = WARM_START_STEPS,
    batch_size: int = WARM_START_BATCH,
    lr: float = WARM_START_LR,
    seed: int = WARM_START_SEED,
) -> list[float]:
    """Train ``model`` (all weights, in place) on formatted examples of ``rows``; return the losses.

    rows: dataset rows with ``prompt`` (chat), ``answer`` and ``db_set``. Deterministic for a seed.
    """
    if not rows:
        raise ValueError("supervised_warm_start needs at least one row")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        picked = rng.sample(rows, min(batch_size, len(rows)))
        batch = supervised_batch(
            tokenizer, [{**row, "target": formatted_completion(row["answer"], row["db_set"])} for row in picked]
        )
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def fixture_rows() -> list[dict]:
    """The training rows of the bundled fixtures (data/fixtures), all three sources, eval rows excluded."""
    from data import gsm8k, health_benchmarks, pubmedqa
    from data.common import FIXTURES_DIR

    sources = [
        gsm8k.load("train", str(FIXTURES_DIR / "gsm8k_{split}.jsonl")),
        pubmedqa.load("train", str(FIXTURES_DIR / "pubmedqa_{split}.jsonl")),
        health_benchmarks.load("train", str(FIXTURES_DIR / "health_benchmarks_*.jsonl")),
    ]
    return [row for ds in sources for row in ds]
