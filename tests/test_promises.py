"""Behaviours the docs promise that no other test checked (issue 23), on the tiny model with a sampler that
returns planted texts, so that every expected number is worked out here from the texts and the stream's rows:

- an update that leaves a non-finite weight is put back (tests/test_trainer.py covers a NaN *loss*, which is
  skipped before the optimiser runs; here the optimiser itself writes an inf);
- dynamic sampling's extra round when the first round's groups all carry no signal;
- in one short real run (``fit``): the values of ``reward``, ``reward_std``, ``frac_reward_zero_std``,
  ``rewards/<fn>/mean``, ``reward/<source>``, ``accuracy/<source>``, ``completions/*``; the cosine schedule
  with warmup; ``max_grad_norm`` clipping (the logged norm is the one before clipping, the optimiser sees the
  clipped one); ``eval_steps``; ``save_total_limit``; the ``log_completions`` lines;
- a ``max_steps`` stop in the middle of a rollout (``steps_per_generation`` 2) resumes with a fresh rollout and
  the adaptive entropy coefficient;
- a first Ctrl-C or SIGTERM asks to stop, a second Ctrl-C stops at once.

Already covered elsewhere, so not here: NaN-loss skipping and the stop after ``max_nonfinite_updates``
(test_trainer.py::test_non_finite_updates_are_skipped_then_stop_the_run), the signal / SIGKILL resumes
(test_trainer.py), two processes (test_trainer.py::test_accelerate_two_processes_end_with_identical_adapters).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from typing import Any

import pytest
import torch
from tiny_run import tiny

import grpo.trainer as trainer
from grpo.config import load_config
from grpo.evaluation import eval_subset
from grpo.signals import stop_requests
from grpo.trainer import release_output_dir
from models.samplers import Sampler
from rewards.answer import correctness_reward_func

G = 4
P = 2  # prompts per step
# one word each, so words_reward is the same for all and the spread comes from correctness alone: a GSM8K
# prompt whose answer is neither 27 nor 4536 gets four zeros (a group with no signal)
TEXTS = ["<answer>yes</answer>", "<answer>no</answer>", "<answer>27</answer>", "<answer>4536</answer>"]
SETTINGS = [
    *tiny(), "--per_device_train_batch_size", str(P), "--max_completion_length", "8",
    "--learning_rate", "1e-3", "--load_in_4bit", "false", "--optim", "adamw_torch",
    "--gradient_checkpointing", "false", "--dataset_mixture", "1", "1", "0",
]  # fmt: skip


def words_reward(completions: list[str], **columns: Any) -> list[float]:
    """The number of words."""
    return [float(len(text.split())) for text in completions]


class FixedSampler(Sampler):
    """Completion g of every prompt is ``texts(call)[g]`` then EOS; ``call`` counts the generate calls."""

    name = "fixed"

    def __init__(self, tokenizer, settings, texts=lambda call: TEXTS):
        super().__init__(tokenizer, settings)
        self.texts, self.calls = texts, 0

    def _generate(self, prompt_ids, num_generations, seeds, settings):
        texts = self.texts(self.calls)
        self.calls += 1
        out = []
        for p in range(len(prompt_ids)):
            for g in range(num_generations):
                ids = self.tokenizer(texts[g % len(texts)], add_special_tokens=False).input_ids
                ids = ids + self.stop_token_ids[:1]
                out.append(self._completion(p, ids, [0.0] * len(ids), settings.max_completion_length))
        return out

    def update_policy(self, model: Any) -> None:
        pass


def make_run(out, *args: str, texts=lambda call: TEXTS):
    cfg = load_config([*SETTINGS, *args, "--output_dir", str(out)])
    run = trainer.setup(cfg)
    run.sampler.close()
    run.sampler = FixedSampler(run.tokenizer, run.sampler.settings, texts)
    return run


def lora(run) -> list[torch.nn.Parameter]:
    return run.trainable_params


# ----------------------------------------------------------------------------- single steps


@pytest.mark.slow
def test_an_update_that_leaves_a_non_finite_weight_is_put_back(tmp_path):
    run = make_run(tmp_path, "--max_steps", "4", "--reward_funcs", "test_promises:words_reward",
                   "--warmup_ratio", "0")  # fmt: skip
    try:
        trainer.grpo_step(run)  # one good step first, so the weights and Adam state are not the initial ones
        before = [p.detach().clone() for p in lora(run)]
        real_step = run.optimizer.step

        def poisoned_step(*args, **kwargs):  # as a huge learning rate would: the step writes an inf
            result = real_step(*args, **kwargs)
            with torch.no_grad():
                lora(run)[0].view(-1)[0] = float("inf")
            return result

        run.optimizer.step = poisoned_step
        lr_before = run.scheduler.get_last_lr()[0]
        (record,) = trainer.grpo_step(run)
        assert record["skipped_updates"] == 1 and run.state.skipped_updates == 1
        assert run.state.nonfinite_streak == 1 and run.state.step == 2
        assert all(torch.equal(p, b) for p, b in zip(lora(run), before, strict=True))
        assert record["learning_rate"] == lr_before  # the schedule still moves: the step counts
        assert all(p.grad is None for p in lora(run))

        run.optimizer.step = real_step  # the next good update resets the streak, keeps the count
        (record,) = trainer.grpo_step(run)
        assert record["skipped_updates"] == 1 and run.state.nonfinite_streak == 0
        assert not all(torch.equal(p, b) for p, b in zip(lora(run), before, strict=True))
    finally:
        release_output_dir(run.config.output_dir)


@pytest.mark.slow
def test_dynamic_sampling_samples_again_when_no_group_has_a_signal(tmp_path):
    # round 1: four identical texts (every group's rewards equal); round 2: 1, 2, 3 and 4 words
    varied = ["a", "a b", "a b c", "a b c d"]
    run = make_run(
        tmp_path, "--max_steps", "2", "--reward_funcs", "test_promises:words_reward",
        "--dynamic_sampling", "true", "--max_sampling_rounds", "3",
        texts=lambda call: ["same"] * G if call == 0 else varied,
    )  # fmt: skip
    try:
        (record,) = trainer.grpo_step(run)
    finally:
        release_output_dir(run.config.output_dir)
    assert run.sampler.calls == 2
    assert record["sampling/rounds"] == 2.0
    assert record["sampling/informative_groups"] == float(P)
    assert record["sampling/filler_groups"] == 0.0
    assert run.state.data_position == 2 * P  # both rounds' prompts are used up
    # trained on the second round's groups: rewards 1..4 in each group, mean 2.5, none without signal
    assert record["reward"] == pytest.approx(2.5)
    assert record["frac_reward_zero_std"] == 0.0


# ----------------------------------------------------------------------------- one short real run

STEPS = 4
MAX_GRAD_NORM = 1e-4  # far below the tiny model's gradient norms, so clipping binds on every step
LR, WARMUP_RATIO, SAVE_TOTAL_LIMIT, EVAL_STEPS = 1e-3, 0.5, 2, 3


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("promises")
    run = make_run(
        out, "--max_steps", str(STEPS), "--save_steps", "1", "--save_total_limit", str(SAVE_TOTAL_LIMIT),
        "--warmup_ratio", str(WARMUP_RATIO), "--lr_scheduler_type", "cosine", "--learning_rate", str(LR),
        "--max_grad_norm", str(MAX_GRAD_NORM), "--eval_steps", str(EVAL_STEPS), "--eval_size", "1",
        "--log_completions", "true", "--logging_steps", "1", "--num_completions_to_print", "2",
        "--reward_funcs", "correctness_reward_func", "test_promises:words_reward",
    )  # fmt: skip
    seen_norms = []  # the gradient norm left for the optimiser, after the trainer's clip
    real_clip = trainer.clip_gradients

    def spying_clip(params, max_norm):
        norm = real_clip(params, max_norm)
        seen_norms.append(torch.cat([p.grad.detach().flatten() for p in params]).norm().item())
        return norm

    printed = []  # what log_completions writes through the progress bar
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(trainer, "clip_gradients", spying_clip)
            patch.setattr(trainer.tqdm, "write", staticmethod(lambda s, *a, **k: printed.append(s)))
            trainer.fit(run)
    finally:
        release_output_dir(run.config.output_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = run.train_data.rows(0, P * STEPS)
    eval_rows = eval_subset(run.config, run.tokenizer, size=1)
    return out, records, rows, seen_norms, printed, run.tokenizer, eval_rows


def expected_step_metrics(rows: list[dict], tokenizer) -> dict[str, float]:
    """The metrics of one step, written from their definitions (TRL 1.16, docs) on the planted texts."""
    texts = [t for _ in rows for t in TEXTS]
    answers = [r["answer"] for r in rows for _ in TEXTS]
    sources = [r["db_set"] for r in rows for _ in TEXTS]
    correct = correctness_reward_func(texts, answer=answers, db_set=sources)
    words = [float(len(t.split())) for t in texts]
    totals = [c + w for c, w in zip(correct, words, strict=True)]
    n = len(totals)
    mean = sum(totals) / n
    groups = [totals[i : i + G] for i in range(0, n, G)]
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) + 1 for t in texts]  # + EOS
    out = {
        "reward": mean,
        "reward_std": math.sqrt(sum((t - mean) ** 2 for t in totals) / (n - 1)),
        "frac_reward_zero_std": sum(max(g) == min(g) for g in groups) / len(groups),
        "rewards/correctness_reward_func/mean": sum(correct) / n,
        "rewards/test_promises:words_reward/mean": sum(words) / n,
        "completions/mean_length": sum(lengths) / n,
        "completions/min_length": min(lengths),
        "completions/max_length": max(lengths),
        "completions/clipped_ratio": 0.0,
        "num_completions": n,
    }
    for source in set(sources):
        mine = [i for i in range(n) if sources[i] == source]
        out[f"reward/{source}"] = sum(totals[i] for i in mine) / len(mine)
        out[f"accuracy/{source}"] = sum(correct[i] == 2.0 for i in mine) / len(mine)
    return out


@pytest.mark.slow
def test_reward_and_length_metrics_have_the_values_of_their_definitions(finished):
    _, records, rows, _, _, tokenizer, _ = finished
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    some_zero_std = some_signal = some_correct = False
    for step, record in enumerate(records):
        want = expected_step_metrics(rows[P * step : P * (step + 1)], tokenizer)
        for key, value in want.items():
            assert record[key] == pytest.approx(value, abs=1e-6), (step + 1, key)
        some_zero_std |= 0 < want["frac_reward_zero_std"]
        some_signal |= want["frac_reward_zero_std"] < 1
        some_correct |= any(v > 0 for k, v in want.items() if k.startswith("accuracy/"))
    # the run exercised groups with and without a signal, both sources, and a right answer
    assert some_zero_std and some_signal and some_correct
    assert {r["db_set"] for r in rows} == {"gsm8k", "pubmedqa"}


@pytest.mark.slow
def test_learning_rate_follows_linear_warmup_then_cosine(finished):
    _, records, _, _, _, _, _ = finished
    warmup = math.ceil(WARMUP_RATIO * STEPS)  # 2
    # the rate the step's update used (the schedule's value before its own step): s = 0, 1, 2, 3
    want = [
        LR * s / warmup
        if s < warmup
        else LR * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (STEPS - warmup)))
        for s in range(STEPS)
    ]
    assert want == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])  # worked by hand
    assert [r["learning_rate"] for r in records] == pytest.approx(want, abs=1e-12)


@pytest.mark.slow
def test_max_grad_norm_clips_what_the_optimiser_sees_and_logs_the_norm_before(finished):
    _, records, _, seen_norms, _, _, _ = finished
    assert len(seen_norms) == STEPS
    for record, seen in zip(records, seen_norms, strict=True):
        assert record["grad_norm"] > 10 * MAX_GRAD_NORM  # logged: before clipping
        assert seen == pytest.approx(MAX_GRAD_NORM, rel=1e-3)  # stepped with: clipped


@pytest.mark.slow
def test_eval_metrics_appear_exactly_at_the_eval_steps(finished):
    _, records, _, _, _, _, eval_rows = finished
    with_eval = [r["step"] for r in records if "eval/accuracy" in r]
    assert with_eval == [s for s in range(1, STEPS + 1) if s % EVAL_STEPS == 0] == [3]
    (record,) = [r for r in records if r["step"] == EVAL_STEPS]
    # greedy eval with the same sampler: one completion, TEXTS[0] = "<answer>yes</answer>", per eval prompt
    correct = correctness_reward_func(
        [TEXTS[0]] * len(eval_rows),
        answer=[r["answer"] for r in eval_rows],
        db_set=[r["db_set"] for r in eval_rows],
    )
    assert record["eval/accuracy"] == pytest.approx(sum(c == 2.0 for c in correct) / len(eval_rows))
    assert record["eval/truncated"] == 0.0


@pytest.mark.slow
def test_save_total_limit_keeps_only_the_last_checkpoints(finished):
    out = finished[0]
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert kept == [f"checkpoint-{s}" for s in range(STEPS - SAVE_TOTAL_LIMIT + 1, STEPS + 1)]


@pytest.mark.slow
def test_log_completions_prints_each_steps_first_completions(finished):
    _, records, rows, _, printed, _, _ = finished
    assert len(printed) == STEPS * P  # num_completions_to_print 2 = both groups, every step (logging_steps 1)
    for i, line in enumerate(printed):
        step, row = i // P + 1, rows[i]
        header, body, end = line.split("\n")
        match = re.fullmatch(r"--- step (\d+) sample \((\w+), gold (.*), reward ([\d.]+)\)", header)
        assert match, header
        assert int(match[1]) == step and match[2] == row["db_set"] and match[3] == repr(row["answer"])
        correct = correctness_reward_func([TEXTS[0]], answer=[row["answer"]], db_set=[row["db_set"]])[0]
        assert float(match[4]) == pytest.approx(correct + 1.0, abs=1e-3)  # + one word
        assert body == TEXTS[0]
        assert end == "---"


# ----------------------------------------------------------------------------- a stop in the middle of a rollout


@pytest.mark.slow
def test_a_stop_in_the_middle_of_a_rollout_resumes_with_a_fresh_rollout_and_the_entropy_state(tmp_path):
    """steps_per_generation 2: one rollout of 2 x P prompts feeds 2 optimiser steps. Stopped by max_steps 3,
    the run leaves step 4's half of the second rollout unused (docs/TRAINING.md): resumed to max_steps 4, step
    4 trains on a fresh rollout from prompt 4 x P, and the adaptive entropy coefficient goes on from where
    step 3 left it."""
    common = [
        "--steps_per_generation", "2", "--save_steps", "1", "--warmup_ratio", "0",
        "--reward_funcs", "correctness_reward_func", "test_promises:words_reward",
        # a target above any entropy of the tiny model: the coefficient rises by delta every step
        "--use_adaptive_entropy", "true", "--entropy_target", "100", "--entropy_coef_delta", "0.25",
        "--entropy_coef_max", "10",
    ]  # fmt: skip
    first = make_run(tmp_path, *common, "--max_steps", "3")
    try:
        trainer.fit(first)
    finally:
        release_output_dir(first.config.output_dir)
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["data_position"] == 4 * P  # two whole rollouts sampled
    assert state["entropy_coef"] == pytest.approx(3 * 0.25)

    second = make_run(tmp_path, *common, "--max_steps", "4", "--resume_from_checkpoint", "latest")
    try:
        trainer.fit(second)
    finally:
        release_output_dir(second.config.output_dir)
    assert second.state.step == 4 and second.state.data_position == 6 * P
    assert second.state.entropy_coef == pytest.approx(4 * 0.25)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["entropy_coef"] for r in records] == pytest.approx([0.0, 0.25, 0.5, 0.75])  # the coef used
    rows = first.train_data.rows(0, 6 * P)
    # step 4 trained on the first half of the fresh rollout: prompts 4P .. 5P-1 (not 3P .. 4P-1, the unused half)
    want = expected_step_metrics(rows[4 * P : 5 * P], first.tokenizer)
    for key, value in want.items():
        assert records[3][key] == pytest.approx(value, abs=1e-6), key


# ----------------------------------------------------------------------------- Ctrl-C twice


def _deliver(signum: int) -> None:
    """Send ``signum`` to this process and give Python the bytecode boundary at which its handler runs."""
    os.kill(os.getpid(), signum)
    for _ in range(100):
        time.sleep(0.001)


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_asks_to_stop_and_a_second_ctrl_c_stops_at_once(first):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop_requests() as requested:
        _deliver(first)  # the run would go on to the end of the rollout
        assert requested == [signal.Signals(first).name]
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # put back
