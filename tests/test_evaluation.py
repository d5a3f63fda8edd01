"""Evaluation (grpo/evaluation.py, grpo/report.py, scripts/evaluate.py). The benchmark loaders: test_data.py.

The metric tests plant completions through a fake sampler (a real ``models.samplers.Sampler`` subclass
that returns known texts) and compare the report with numbers worked out by hand below. The model
tests use the tiny offline Qwen2: a LoRA adapter trained a few supervised steps must change what the
model writes, and the CLI must report both sides and their difference.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import medqa
from data.common import FIXTURES_DIR
from grpo.config import GRPOConfig
from grpo.evaluation import (
    eval_subset,
    evaluate,
    evaluate_rows,
    pass_at_k,
    pass_at_k_values,
    score_completions,
    summarize,
)
from grpo.report import compare_reports, format_comparison, format_table, paired_accuracy_se
from models.hf_sampler import HFSampler
from models.policy import AdapterError, load_for_evaluation, read_adapter_config
from models.samplers import Completion, Sampler, SamplingSettings
from models.tiny import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
BENCH = FIXTURES_DIR / "benchmarks"
MEDQA_FILES = str(BENCH / "medqa_{split}.jsonl")
MMLU_FILES = str(BENCH / "mmlu_*_{split}.jsonl")


def strict(answer: str) -> str:
    """A completion in exactly the recipe's layout: every format reward gives it 0.5."""
    return f"<reasoning>\nr\n</reasoning>\n<answer>\n{answer}\n</answer>\n"


def row(question: str, answer: str, db_set: str) -> dict:
    return {"prompt": [{"role": "user", "content": question}], "answer": answer, "db_set": db_set}


# ---------------------------------------------------------------------------- a sampler with planted texts


class PlantedSampler(Sampler):
    """Returns, for the prompt whose user message is ``q``, the completions ``script[q]`` in order:
    (text, number of tokens, truncated). Records the seed and settings of every call."""

    name = "planted"

    def __init__(self, script: dict[str, list[tuple[str, int, bool]]]):
        super().__init__(
            tokenizer=None,
            settings=SamplingSettings(temperature=0.7, max_completion_length=64),
            stop_token_ids=[0],
        )
        self.script = script
        self.questions = list(script)
        self.calls: list[tuple[list[int], SamplingSettings, int]] = []

    def encode(self, prompts):  # the prompt's position in the script stands in for its token ids
        return [[self.questions.index(p[-1]["content"])] for p in prompts]

    def _generate(self, prompt_ids, num_generations, seeds, settings):
        self.calls.append((seeds, settings, len(prompt_ids)))
        out = []
        for p, ids in enumerate(prompt_ids):
            planted = self.script[self.questions[ids[0]]]
            assert len(planted) == num_generations
            for text, n_tokens, truncated in planted:
                out.append(Completion(p, [5] * n_tokens, text, truncated, [0.0] * n_tokens))
        return out

    def update_policy(self, model):
        pass


# Hand-worked example, K = 3 samples per prompt.
#   q0 gsm8k gold 7:   strict("7") 2.0 | strict("7 apples") partial 1.0 | "I don't know" (truncated) -> c = 1
#   q1 gsm8k gold 12:  strict("3") x 3, wrong but an integer                                       -> c = 0
#   q2 med_mc gold B:  strict("B"), strict("B"), strict("A")                                       -> c = 2
#   q3 pubmedqa yes:   strict("yes") x 3                                                           -> c = 3
SCRIPT = {
    "q0": [(strict("7"), 10, False), (strict("7 apples"), 12, False), ("I don't know", 64, True)],
    "q1": [(strict("3"), 10, False)] * 3,
    "q2": [(strict("B"), 9, False), (strict("B"), 9, False), (strict("A"), 9, False)],
    "q3": [(strict("yes"), 11, False)] * 3,
}
DATASETS = {
    "gsm8k": [row("q0", "7", "gsm8k"), row("q1", "12", "gsm8k")],
    "health_benchmarks": [row("q2", "B", "med_mc")],
    "pubmedqa": [row("q3", "yes", "pubmedqa")],
}


@pytest.fixture
def planted_report():
    sampler = PlantedSampler(SCRIPT)
    settings = SamplingSettings(temperature=0.7, max_completion_length=64)
    return evaluate(sampler, DATASETS, samples=3, seed=11, settings=settings, batch_size=1), sampler


# ---------------------------------------------------------------------------- pass@k


def test_pass_at_k_closed_forms():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2)) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # n - c = 1 < k: every pair holds a correct sample
    assert pass_at_k(1, 1, 1) == 1.0


def test_pass_at_k_equals_the_binomial_ratio_everywhere():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)  # comb(m, k) = 0 for m < k
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n_and_rejects_bad_counts():
    # 1 - C(800, 100) / C(1000, 100): the binomials have over 140 digits; the product does not
    assert pass_at_k(1000, 200, 100) == pytest.approx(
        1 - math.comb(800, 100) / math.comb(1000, 100), rel=1e-9
    )
    with pytest.raises(ValueError, match="c=6"):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError, match="k=6"):
        pass_at_k(5, 1, 6)
    assert pass_at_k_values(1) == [1]
    assert pass_at_k_values(6) == [1, 2, 4, 6]
    assert pass_at_k_values(8) == [1, 2, 4, 8]


def test_docstring_examples():
    import doctest

    import data.medqa
    import grpo.evaluation

    for module in (grpo.evaluation, data.medqa):
        assert doctest.testmod(module).failed == 0, module.__name__


# ---------------------------------------------------------------------------- metrics on planted completions


def test_metrics_equal_hand_computed_values(planted_report):
    report, _ = planted_report
    gsm = report["sources"]["gsm8k"]
    assert gsm["n_prompts"] == 2 and gsm["n_completions"] == 6
    assert gsm["accuracy"] == pytest.approx(1 / 6)  # one 2.0 among six
    assert gsm["partial_rate"] == pytest.approx(1 / 6)  # "7 apples"
    assert gsm["strict_format_rate"] == pytest.approx(5 / 6)  # all but "I don't know"
    assert gsm["answer_type_rate"] == pytest.approx(4 / 6)  # "7" and three "3"; not "7 apples", not ""
    # totals: 4.0 (all five rewards), 2.5 (formats 1.5 + partial 1.0), 0.0, three times 2.0 (formats + int)
    assert gsm["mean_reward"] == pytest.approx((4.0 + 2.5 + 0.0 + 3 * 2.0) / 6)
    assert gsm["mean_completion_length"] == pytest.approx((10 + 12 + 64 + 3 * 10) / 6)
    assert gsm["truncation_rate"] == pytest.approx(1 / 6)
    # per-prompt correct counts c = 1 and 0 out of n = 3
    assert gsm["pass@1"] == pytest.approx((1 / 3 + 0) / 2)
    assert gsm["pass@2"] == pytest.approx(((1 - 1 / 3) + 0) / 2)  # 1 - C(2,2)/C(3,2) = 2/3
    assert gsm["pass@3"] == pytest.approx((1 + 0) / 2)
    # per-prompt accuracies [1/3, 0]: std (ddof 1) = sqrt(2) / 6, divided by sqrt(2 prompts) = 1/6
    assert gsm["accuracy_se"] == pytest.approx(1 / 6)

    mc = report["sources"]["health_benchmarks"]
    assert mc["accuracy"] == pytest.approx(2 / 3)
    assert mc["pass@2"] == 1.0  # n - c = 1 < 2
    assert mc["accuracy_se"] is None  # one prompt: no spread to measure
    assert report["sources"]["pubmedqa"]["accuracy"] == 1.0
    assert report["sources"]["pubmedqa"]["mean_reward"] == pytest.approx(4.0)

    everything = report["all"]
    assert everything["n_prompts"] == 4 and everything["n_completions"] == 12
    assert everything["accuracy"] == pytest.approx((1 + 0 + 2 + 3) / 12)
    assert everything["pass@3"] == pytest.approx((1 + 0 + 1 + 1) / 4)
    # pass@1 is the accuracy: the mean over all samples
    for metrics in [*report["sources"].values(), everything]:
        assert metrics["pass@1"] == pytest.approx(metrics["accuracy"])


def test_report_keeps_every_completion_and_its_scores(planted_report):
    report, sampler = planted_report
    first = report["prompts"]["gsm8k"][0]
    assert first["answer"] == "7" and first["index"] == 0
    assert first["completions"] == [t for t, _, _ in SCRIPT["q0"]]
    assert first["correctness"] == [2.0, 1.0, 0.0]
    assert first["lengths"] == [10, 12, 64] and first["truncated"] == [False, False, True]
    # batch_size=1: one call per prompt, each with its own seed, all with the settings given
    assert len(sampler.calls) == 4
    assert len({seed for seeds, _, _ in sampler.calls for seed in seeds}) == 4
    assert all(s.temperature == 0.7 for _, s, _ in sampler.calls)
    json.dumps(report)  # the report is plain JSON


def test_evaluation_is_independent_of_the_batch_split_for_planted_texts():
    a = evaluate(PlantedSampler(SCRIPT), DATASETS, samples=3, batch_size=1)
    b = evaluate(PlantedSampler(SCRIPT), DATASETS, samples=3, batch_size=8)
    assert a["sources"] == b["sources"]


def test_summarize_needs_k_records_per_prompt():
    records = [{"prompt": 0, "correctness": 2.0, "strict_format": 0.5, "answer_type": 0.5, "reward": 4.0,
                "length": 3, "truncated": False}]  # fmt: skip
    with pytest.raises(ValueError, match="prompt 0 has 1 completions, expected samples=2"):
        summarize(records, 2)


# ---------------------------------------------------------------------------- markdown agrees with JSON


def parse_markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the first markdown table in ``text``."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    assert all(set(c) <= set(":-") for c in cells[1]), "second line is the alignment row"
    return cells[0], cells[2:]


def as_shown(value, kind: str):
    """The number a table cell should show for a JSON value (independent of format_value)."""
    if value is None:
        return None
    return round(100 * value, 1) if kind == "pct" else value


def test_table_and_json_agree(planted_report):
    report, _ = planted_report
    header, rows = parse_markdown_table(format_table(report))
    assert header[:2] == ["source", "prompts"]
    columns = {
        "accuracy %": ("accuracy", "pct"), "± SE": ("accuracy_se", "pct"), "partial %": ("partial_rate", "pct"),
        "strict format %": ("strict_format_rate", "pct"), "answer type %": ("answer_type_rate", "pct"),
        "mean reward": ("mean_reward", "float"), "mean length": ("mean_completion_length", "float"),
        "truncated %": ("truncation_rate", "pct"), "pass@2 %": ("pass@2", "pct"),
        "pass@3 %": ("pass@3", "pct"),
    }  # fmt: skip
    assert set(columns) | {"source", "prompts"} == set(header)
    table = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert list(table) == ["gsm8k", "health_benchmarks", "pubmedqa", "all"]
    for name, cells in table.items():
        metrics = report["all"] if name == "all" else report["sources"][name]
        assert int(cells["prompts"]) == metrics["n_prompts"]
        for column, (key, kind) in columns.items():
            expected = as_shown(metrics[key], kind)
            if expected is None:
                assert cells[column] == "-"
            else:
                assert float(cells[column]) == pytest.approx(expected, abs=0.051), (name, column)
    assert "K = 3 sample(s)" in format_table(report) and "mean over all 3 samples" in format_table(report)


def test_comparison_shows_the_difference():
    base_script = {q: [(strict("0"), 10, False)] * 3 for q in SCRIPT}  # always formatted, never right
    base = evaluate(PlantedSampler(base_script), DATASETS, samples=3)
    trained = evaluate(PlantedSampler(SCRIPT), DATASETS, samples=3)
    comparison = compare_reports(base, trained)
    acc = comparison["gsm8k"]["accuracy"]
    assert (acc["a"], acc["b"]) == (0.0, pytest.approx(1 / 6)) and acc["difference"] == pytest.approx(1 / 6)
    # per-prompt accuracy differences [1/3, 0]: paired SE = (sqrt(2)/6) / sqrt(2) = 1/6
    assert acc["difference_se"] == pytest.approx(1 / 6)
    assert comparison["all"]["accuracy"]["difference"] == pytest.approx(6 / 12)

    header, rows = parse_markdown_table(format_comparison(base, trained, labels=("base", "adapter")))
    assert header == ["source", "metric", "base", "adapter", "adapter − base", "SE of difference"]
    cells = {(r[0], r[1]): r for r in rows}
    assert cells[("gsm8k", "accuracy %")][2:6] == ["0.0", "16.7", "+16.7", "16.7"]
    assert cells[("pubmedqa", "accuracy %")][2:5] == ["0.0", "100.0", "+100.0"]
    assert cells[("gsm8k", "mean length")][4] == f"{(10 + 12 + 64 + 30) / 6 - 10:+.1f}"
    assert cells[("all", "pass@3 %")][4] == "+75.0"
    assert ("all", "pass@1 %") not in cells  # pass@1 is the accuracy row


def test_paired_se_worked_example():
    a = [{"index": i, "answer": "x", "correctness": [c]} for i, c in enumerate([2.0, 0.0, 0.0])]
    b = [{"index": i, "answer": "x", "correctness": [c]} for i, c in enumerate([2.0, 2.0, 0.0])]
    # differences [0, 1, 0]: std = sqrt(1/3) = 0.577, SE = 0.577 / sqrt(3) = 1/3
    assert paired_accuracy_se(a, b) == pytest.approx(1 / 3)
    assert paired_accuracy_se(a, b[:2]) is None  # not the same prompts: no pairing


# ---------------------------------------------------------------------------- during training


def test_evaluate_rows_is_greedy_and_flat():
    rows = [*DATASETS["gsm8k"], *DATASETS["health_benchmarks"], *DATASETS["pubmedqa"]]
    script = {
        "q0": [SCRIPT["q0"][0]],
        "q1": [SCRIPT["q1"][0]],
        "q2": [SCRIPT["q2"][2]],
        "q3": [SCRIPT["q3"][0]],
    }
    sampler = PlantedSampler(script)
    metrics = evaluate_rows(sampler, rows, seed=5)
    (seed, settings, n), *_ = sampler.calls
    assert settings.temperature == 0.0 and settings.max_completion_length == 64 and n == 4
    assert metrics == {
        "eval/reward": pytest.approx((4.0 + 2.0 + 2.0 + 4.0) / 4),  # q2 answers A: formats + type only
        "eval/accuracy": pytest.approx(2 / 4),
        "eval/strict_format": 1.0,
        "eval/answer_type": 1.0,
        "eval/completion_length": pytest.approx((10 + 10 + 9 + 11) / 4),
        "eval/truncated": 0.0,
        "eval/accuracy/gsm8k": pytest.approx(1 / 2),
        "eval/accuracy/med_mc": 0.0,
        "eval/accuracy/pubmedqa": 1.0,
    }
    # weighted like the run: correctness only
    weighted = evaluate_rows(PlantedSampler(script), rows, 5, ["correctness_reward_func"], [0.5])
    assert weighted["eval/reward"] == pytest.approx(0.5 * (2.0 + 0 + 0 + 2.0) / 4)


def fixture_config(**overrides) -> GRPOConfig:
    values = dict(
        gsm8k_data_files=str(FIXTURES_DIR / "gsm8k_{split}.jsonl"),
        pubmedqa_data_files=str(FIXTURES_DIR / "pubmedqa_{split}.jsonl"),
        health_benchmarks_data_files=str(FIXTURES_DIR / "health_benchmarks_*.jsonl"),
        seed=7,
    )
    values.update(overrides)
    return GRPOConfig(**values)


def test_eval_subset_is_fixed_seeded_and_drawn_from_the_eval_sets():
    from data.mixture import build_eval_datasets

    config = fixture_config()
    subset = eval_subset(config, None, size=5)
    assert [r["db_set"] for r in subset] == ["gsm8k"] * 5 + ["med_mc"] * 5 + ["pubmedqa"] * 5
    assert eval_subset(config, None, size=5) == subset  # the same rows every time
    eval_sets = build_eval_datasets(config, None)
    for r in subset:
        assert r in eval_sets[r["db_set"]].to_list()
    assert len({r["prompt"][1]["content"] for r in subset}) == 15
    assert eval_subset(fixture_config(seed=8), None, size=5) != subset
    assert len(eval_subset(config, None, size=1000)) == sum(len(d) for d in eval_sets.values())


# ---------------------------------------------------------------------------- CLI errors (no model loaded)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import evaluate as cli
    finally:
        sys.path.pop(0)
    code = cli.main(args)
    return code, capsys.readouterr().err


def test_cli_names_the_flag_of_a_bad_request(tmp_path, capsys):
    code, err = run_cli(["--adapter", str(tmp_path / "nope")], capsys)
    assert code == 2 and "--adapter" in err and "nope" in err and "no such folder" in err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    code, err = run_cli(["--compare", "base", str(tmp_path / "half")], capsys)
    assert code == 2 and "--compare" in err and "missing adapter_model.safetensors" in err
    code, err = run_cli(["--sources", "gsm8k", "medqaa"], capsys)
    assert code == 2 and "--sources: unknown source(s) medqaa" in err and "mmlu_medical" in err
    code, err = run_cli(["--samples", "0"], capsys)
    assert code == 2 and "--samples 0" in err
    code, err = run_cli(["--output", str(tmp_path / "no" / "where.json")], capsys)
    assert code == 2 and "--output" in err
    with pytest.raises(AdapterError, match="target_modules"):
        (tmp_path / "pattern").mkdir()
        (tmp_path / "pattern" / "adapter_model.safetensors").write_bytes(b"")
        (tmp_path / "pattern" / "adapter_config.json").write_text(
            '{"r": 8, "lora_alpha": 16, "target_modules": ".*proj"}'
        )
        read_adapter_config(str(tmp_path / "pattern"))


# ---------------------------------------------------------------------------- the tiny model: base vs adapter

TARGET = "<reasoning>\nI compare the four options.\n</reasoning>\n<answer>\nA\n</answer>\n"


def tiny_config(**overrides) -> GRPOConfig:
    values = dict(
        model_name_or_path=TINY_MODEL, load_in_4bit=False, dtype="fp32", lora_r=8, lora_alpha=16,
        gradient_checkpointing=False, max_completion_length=12, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return GRPOConfig(**values)


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory) -> str:
    """A LoRA adapter after 8 supervised AdamW steps towards answering short questions with TARGET.

    The tiny random model does not learn TARGET in 8 steps; it does not need to: the adapter's B
    matrices are no longer zero, so the adapted model computes (and writes) something else.
    """
    from models.policy import load_policy, save_adapter

    model, tokenizer = load_policy(tiny_config())
    sequences, labels = [], []
    for i in range(4):
        chat = [{"role": "user", "content": f"Question {i}: which option?"}]
        prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t_ids = tokenizer(TARGET, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append(p_ids + t_ids)
        labels.append([-100] * len(p_ids) + t_ids)
    width = max(map(len, sequences))
    pad = tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the steps did train
    folder = str(tmp_path_factory.mktemp("adapter") / "checkpoint-8")
    save_adapter(model, folder)
    return folder


def greedy_texts(model, tokenizer, rows) -> list[str]:
    sampler = HFSampler(model, tokenizer, SamplingSettings(temperature=0, max_completion_length=12))
    prompt_ids = sampler.encode([r["prompt"] for r in rows])
    return [c.text for c in sampler.generate(prompt_ids, 1, [0] * len(prompt_ids))]


@pytest.mark.slow
def test_adapter_changes_the_completions_and_base_is_exactly_the_base_model(trained_adapter):
    from models.policy import load_base_model, load_tokenizer, resolve_model_path

    config = tiny_config()
    rows = medqa.load("test", MEDQA_FILES).to_list()[:4]
    base_model, tokenizer = load_for_evaluation(config, None)
    adapted_model, _ = load_for_evaluation(config, trained_adapter)
    base_texts = greedy_texts(base_model, tokenizer, rows)
    adapted_texts = greedy_texts(adapted_model, tokenizer, rows)
    assert base_texts != adapted_texts
    # the "base" side (a fresh LoRA, B = 0) writes exactly what the plain model without LoRA writes
    plain = load_base_model(config, path=resolve_model_path(TINY_MODEL))
    plain_tokenizer = load_tokenizer(resolve_model_path(TINY_MODEL))
    assert greedy_texts(plain, plain_tokenizer, rows) == base_texts


@pytest.mark.slow
def test_cli_compares_base_and_adapter_end_to_end(trained_adapter, tmp_path):
    output = tmp_path / "report.json"
    command = [
        sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", TINY_MODEL, "--load_in_4bit", "false",
        "--dtype", "fp32", "--sampler", "hf", "--compare", "base", trained_adapter, "--sources", "medqa",
        "mmlu_medical", "--medqa_data_files", MEDQA_FILES, "--mmlu_medical_data_files", MMLU_FILES,
        "--limit", "3", "--max_completion_length", "12", "--output", str(output),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    a, b = report["a"], report["b"]
    assert a["adapter"] is None and b["adapter"] == trained_adapter
    assert a["sources"]["medqa"]["n_prompts"] == 3 and a["settings"]["temperature"] == 0.0
    assert a["prompts"]["medqa"][0]["answer"] == b["prompts"]["medqa"][0]["answer"]
    a_texts = [t for s in ("medqa", "mmlu_medical") for p in a["prompts"][s] for t in p["completions"]]
    b_texts = [t for s in ("medqa", "mmlu_medical") for p in b["prompts"][s] for t in p["completions"]]
    assert a_texts != b_texts
    for source in ("medqa", "mmlu_medical", "all"):
        for key, values in report["comparison"][source].items():
            assert values["difference"] == pytest.approx(values["b"] - values["a"]), (source, key)

    # stdout: table A, table B, then the comparison, each agreeing with the JSON
    sections = done.stdout.split("## ")[1:]
    assert [s.splitlines()[0] for s in sections] == ["A: base", f"B: {trained_adapter}", "B - A"]
    for section, side in zip(sections[:2], (a, b), strict=True):
        header, rows = parse_markdown_table(section)
        for r in rows:
            metrics = side["all"] if r[0] == "all" else side["sources"][r[0]]
            assert float(r[header.index("strict format %")]) == pytest.approx(
                100 * metrics["strict_format_rate"], abs=0.051
            )
    header, rows = parse_markdown_table(sections[2])
    diff = {(r[0], r[1]): float(r[4]) for r in rows}
    expected = report["comparison"]["medqa"]["strict_format_rate"]["difference"]
    assert diff[("medqa", "strict format %")] == pytest.approx(100 * expected, abs=0.051)
    assert diff[("all", "mean length")] == pytest.approx(
        report["comparison"]["all"]["mean_completion_length"]["difference"], abs=0.051
    )


def test_score_completions_with_a_users_reward_function(tmp_path, monkeypatch):
    """A run that trains with a reward of its own (a judge, a user's module) is evaluated with it: the total is
    its weighted sum, while correctness and the format rates stay the five built-ins' (they did KeyError)."""
    (tmp_path / "eval_user_rewards.py").write_text(
        "def length_bonus(completions, **kwargs):\n    return [0.01 * len(c) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    text = "<reasoning>\nr\n</reasoning>\n<answer>\nB\n</answer>\n"  # 41 characters
    [scores] = score_completions(
        [text], ["B"], ["med_mc"], ["correctness_reward_func", "eval_user_rewards:length_bonus"], [1.0, 2.0]
    )
    assert scores["correctness"] == 2.0 and scores["strict_format"] == 0.5 and scores["answer_type"] == 0.5
    assert scores["reward"] == pytest.approx(2.0 + 2.0 * 0.01 * len(text))


def test_cli_compare_keeps_each_side_and_a_killed_compare_goes_on_from_the_last_side(
    trained_adapter, tmp_path, capsys, monkeypatch
):
    """Each side's report is saved as it ends (``<output>.sides/``): a compare killed during its second side
    evaluates only that side when run again, and its report equals an uninterrupted run's; a side whose adapter
    files change, or a run with --fresh, is evaluated again."""
    import grpo.evaluation

    adapter = tmp_path / "checkpoint-8"
    adapter.mkdir()
    for f in Path(trained_adapter).iterdir():
        (adapter / f.name).write_bytes(f.read_bytes())
    args = [
        "--model", TINY_MODEL, "--load_in_4bit", "false", "--dtype", "fp32", "--sampler", "hf",
        "--sources", "medqa", "--medqa_data_files", MEDQA_FILES, "--limit", "2", "--max_completion_length", "6",
    ]  # fmt: skip
    evaluated: list[int] = []  # the number of prompts of each side evaluated (not read back)
    real_evaluate = grpo.evaluation.evaluate

    def counting_evaluate(sampler, sets, *rest, **kw):
        if kill_at is not None and len(evaluated) == kill_at:
            raise KeyboardInterrupt  # the run killed while it evaluates this side
        evaluated.append(sum(len(rows) for rows in sets.values()))
        return real_evaluate(sampler, sets, *rest, **kw)

    monkeypatch.setattr(grpo.evaluation, "evaluate", counting_evaluate)

    # the uninterrupted run, in a folder of its own
    kill_at = None
    whole = tmp_path / "whole.json"
    assert run_cli([*args, "--output", str(whole), "--compare", "base", str(adapter)], capsys)[0] == 0
    assert evaluated == [2, 2] and len(list((tmp_path / "whole.sides").iterdir())) == 2

    # killed during the second side: the first side is on disk, the report is not
    evaluated.clear()
    kill_at = 1
    out = tmp_path / "cmp.json"
    with pytest.raises(KeyboardInterrupt):
        run_cli([*args, "--output", str(out), "--compare", "base", str(adapter)], capsys)
    assert evaluated == [2] and not out.exists()
    assert [p.name.split("-")[0] for p in (tmp_path / "cmp.sides").iterdir()] == ["base"]

    # run again: the base side is read back, only the adapter side is evaluated, the report is the same
    evaluated.clear()
    kill_at = None
    code, err = run_cli([*args, "--output", str(out), "--compare", "base", str(adapter)], capsys)
    assert code == 0 and evaluated == [2] and "base: read back from" in err
    resumed, reference = json.loads(out.read_text()), json.loads(whole.read_text())
    for key in ("a", "b", "comparison"):
        assert resumed[key] == reference[key], key

    # both sides saved now: nothing is evaluated; the adapter's files rewritten: that side again; --fresh: all
    evaluated.clear()
    assert run_cli([*args, "--output", str(out), "--compare", "base", str(adapter)], capsys)[0] == 0
    assert evaluated == []
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes())
    os.utime(weights, ns=(1, 1))  # another modification time, whatever the clock's resolution
    assert run_cli([*args, "--output", str(out), "--compare", "base", str(adapter)], capsys)[0] == 0
    assert evaluated == [2]
    evaluated.clear()
    assert run_cli([*args, "--output", str(out), "--compare", "base", str(adapter), "--fresh"], capsys)[0] == 0
    assert evaluated == [2, 2]
