"""Loaders, prompts, the length filter and the training mixture (data/)."""

from __future__ import annotations

import doctest
import itertools
import json
import logging
import math
import re
from collections import Counter
from pathlib import Path

import datasets
import pytest

import data.gsm8k
import data.health_benchmarks
import data.prompts
import data.pubmedqa
from data import gsm8k, health_benchmarks, medmcqa, medqa, mmlu_medical, pubmedqa
from data.common import FIXTURES_DIR, DataError, resolve_data_files
from data.eval_sets import evenly_spaced, load_eval_set
from data.mixture import SOURCES, MixtureStream, build_eval_datasets, build_train_dataset
from data.prompts import SYSTEM_PROMPT, filter_long_prompts, prompt_lengths
from grpo.config import GRPOConfig

ROOT = Path(__file__).resolve().parents[1]
TEST_FIXTURES = Path(__file__).resolve().parent / "fixtures"
REAL_DATA = ROOT / "data" / "real"  # real hub rows shipped with the project (data/real/README.md)
GSM8K_FILES = str(FIXTURES_DIR / "gsm8k_{split}.jsonl")
PUBMEDQA_FILES = str(FIXTURES_DIR / "pubmedqa_{split}.jsonl")
HB_FILES = str(FIXTURES_DIR / "health_benchmarks_*.jsonl")


def read_jsonl(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def user_message(row: dict) -> str:
    return row["prompt"][1]["content"]


def fixture_config(**overrides) -> GRPOConfig:
    values = dict(
        gsm8k_data_files=GSM8K_FILES,
        pubmedqa_data_files=PUBMEDQA_FILES,
        health_benchmarks_data_files=HB_FILES,
        seed=7,
    )
    values.update(overrides)
    return GRPOConfig(**values)


# ---------------------------------------------------------------------------- a tiny real tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def word_tokenizer():
    """A real transformers tokenizer (WordLevel, whitespace/punctuation pre-tokenizer, ChatML template):
    its token count is the number of ``\\w+|[^\\w\\s]+`` pieces, which the tests count independently."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", chat_template=CHATML)


def reference_length(prompt: list[dict]) -> int:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in prompt)
    return len(re.findall(r"\w+|[^\w\s]+", text + "<|im_start|>assistant\n"))


# ---------------------------------------------------------------------------- prompts


def test_prompts_are_the_recipe_strings():
    assert SYSTEM_PROMPT == (
        "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
    )
    assert data.prompts.gsm8k_user_prompt("What is 2 + 2?") == "What is 2 + 2?"
    assert data.prompts.pubmedqa_user_prompt(["C1.", "C2."], "Q?") == (
        "Given the scientific context below:\nC1.\nC2.\n\nAnswer the following question:\nQ? with 'yes', "
        "'no' or 'maybe'. You need to carefully review the context and reason before answering."
    )
    assert data.prompts.health_benchmarks_user_prompt("Q?\nA) a\nB) b\nC) c\nD) d") == (
        "\n\nAnswer the following question:\nQ?\nA) a\nB) b\nC) c\nD) d\n With 'A', 'B', 'C' or 'D'. "
        "You need to carefully review the context and reason before answering."
    )
    assert data.prompts.make_prompt("hi") == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "hi"},
    ]


def test_docstring_examples():
    for module in (data.prompts, data.gsm8k, data.health_benchmarks):
        assert doctest.testmod(module).failed == 0, module.__name__


# ---------------------------------------------------------------------------- GSM8K


def test_gsm8k_fixture_rows_match_the_raw_file():
    raw = read_jsonl(FIXTURES_DIR / "gsm8k_test.jsonl")
    ds = gsm8k.load("test", GSM8K_FILES)
    assert ds.column_names == ["prompt", "answer", "db_set"]
    assert len(ds) == len(raw)
    for row, src in zip(ds, raw, strict=True):
        assert row["prompt"] == [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": src["question"]},
        ]
        assert row["answer"] == src["answer"].split("####")[-1].strip().replace(",", "")
        assert row["db_set"] == "gsm8k"
    answers = set(ds["answer"])
    assert any(a.startswith("-") for a in answers)  # the fixture has negative answers ...
    assert any("," in r["answer"].split("####")[-1] for r in raw)  # ... and thousands separators


def test_gsm8k_malformed_rows_are_skipped_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="data.common"):
        ds = gsm8k.load("train", str(TEST_FIXTURES / "gsm8k_malformed.jsonl"))
    # Rows 0, 1, 2, 9 are valid; 2,400 loses its separator, -7 keeps its sign, the last #### wins.
    assert ds["answer"] == ["5", "2400", "-7", "4"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "gsm8k: skipped 6 malformed row(s) of 10" in message
    for reason in (
        "no '####' line in answer: 1 (first at row 3)",
        "empty question: 1",
        "question missing or not a string: 1",
        "answer missing, empty or not a string: 2",
        "'####' not followed by a number: 1",
    ):
        assert reason in message


def test_gsm8k_parse_final_answer():
    assert gsm8k.parse_final_answer("a\n#### 850,000") == "850000"
    assert gsm8k.parse_final_answer("#### +12") == "12"
    assert gsm8k.parse_final_answer("#### 1.5") == "1.5"
    assert gsm8k.parse_final_answer("#### 1,00") is None  # not a thousands separator
    assert gsm8k.parse_final_answer("no marker 12") is None


def test_source_with_no_valid_row_names_source_and_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "answer": "no marker"}\n{"question": "", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match=r"gsm8k: no valid row left in .*bad\.jsonl"):
        gsm8k.load("train", str(bad))


def test_missing_files_and_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"gsm8k: no data file matches .*nothing_test\.jsonl"):
        gsm8k.load("test", str(tmp_path / "nothing_{split}.jsonl"))
    with pytest.raises(DataError, match="split='dev'"):
        gsm8k.load("dev", GSM8K_FILES)
    (tmp_path / "x.csv").write_text("question,answer\n")
    with pytest.raises(DataError, match="unsupported format"):
        gsm8k.load("train", str(tmp_path / "x.csv"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "Q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(DataError, match=r"gsm8k: could not read .*broken\.jsonl"):
        gsm8k.load("train", str(broken))


def test_resolve_data_files_forms(tmp_path, monkeypatch):
    for name in ("a_train.jsonl", "a_test.jsonl", "b_train.jsonl", "notes.txt"):
        (tmp_path / name).write_text("{}\n")
    assert resolve_data_files(str(tmp_path / "a_{split}.jsonl"), "test", "s") == [
        str(tmp_path / "a_test.jsonl")
    ]
    assert resolve_data_files(str(tmp_path / "*_train.jsonl"), "test", "s") == [
        str(tmp_path / "a_train.jsonl"),
        str(tmp_path / "b_train.jsonl"),
    ]
    assert resolve_data_files({"test": [str(tmp_path / "b_train.jsonl")]}, "test", "s") == [
        str(tmp_path / "b_train.jsonl")
    ]
    assert len(resolve_data_files(str(tmp_path), "train", "s")) == 3  # a folder: json/jsonl/parquet only
    with pytest.raises(DataError, match="no entry for split 'train'"):
        resolve_data_files({"test": "x"}, "train", "s")
    # relative paths fall back to the project root: the shipped fixtures are found from anywhere
    monkeypatch.chdir(tmp_path)
    found = resolve_data_files("data/fixtures/gsm8k_{split}.jsonl", "test", "s")
    assert found == [str(ROOT / "data" / "fixtures" / "gsm8k_test.jsonl")]


def test_parquet_gives_the_same_rows_as_jsonl(tmp_path):
    raw = read_jsonl(FIXTURES_DIR / "gsm8k_test.jsonl")
    datasets.Dataset.from_list(raw).to_parquet(str(tmp_path / "gsm8k_test.parquet"))
    assert (
        gsm8k.load("test", str(tmp_path / "gsm8k_{split}.parquet")).to_list()
        == gsm8k.load("test", GSM8K_FILES).to_list()
    )


# ---------------------------------------------------------------------------- PubMedQA


def test_pubmedqa_train_rows_from_dict_of_lists_context():
    raw = read_jsonl(FIXTURES_DIR / "pubmedqa_train.jsonl")
    ds = pubmedqa.load("train", PUBMEDQA_FILES)
    assert len(ds) == len(raw)  # all synthetic contexts are short, none is a test pubid
    src, row = raw[0], ds[0]
    expected = (
        "Given the scientific context below:\n"
        + "\n".join(src["context"]["contexts"])
        + "\n\nAnswer the following question:\n"
        + src["question"]
        + " with 'yes', 'no' or 'maybe'. You need to carefully review the context and reason before answering."
    )
    assert user_message(row) == expected
    assert row["answer"] == src["final_decision"] and row["db_set"] == "pubmedqa"
    assert set(ds["answer"]) == {"yes", "no"}  # pqa_artificial has no maybe


def test_pubmedqa_malformed_rows_and_test_pubid_exclusion(caplog):
    with caplog.at_level(logging.INFO, logger="data.common"):
        ds = pubmedqa.load("train", str(TEST_FIXTURES / "pubmedqa_malformed.jsonl"))
    # valid: rows 0, 1, 6 ("91000007" as a string, "Yes " normalised); row 7 is official test pubid 7482275
    assert ds["answer"] == ["yes", "no", "yes"]
    assert 7482275 in pubmedqa.official_test_pubids()
    assert not any("bread" in user_message(r) for r in ds)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pubmedqa: skipped 6 malformed row(s) of 10" in warnings[0]
    for reason in (
        "context.contexts missing or not a list of strings: 3",
        "final_decision missing or not yes/no/maybe: 1",
        "pubid missing or not an integer: 1",
        "empty question: 1",
    ):
        assert reason in warnings[0]
    assert any("official test pubid (kept out of training): 1" in r.getMessage() for r in caplog.records)


def test_pubmedqa_context_length_boundary(tmp_path):
    def row(pubid, n_chars):  # two contexts joined by "\n": total n_chars
        half = (n_chars - 1) // 2
        contexts = ["a" * half, "b" * (n_chars - 1 - half)]
        return {
            "pubid": pubid,
            "question": f"Q{pubid}?",
            "context": {"contexts": contexts, "labels": [], "meshes": []},
            "long_answer": "",
            "final_decision": "yes",
        }

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(row(92000000 + n, n)) + "\n" for n in (1023, 1024, 1025)))
    assert len(pubmedqa.load("train", str(path))) == 1  # only the 1,023-character context is < 1,024
    assert len(pubmedqa.load("train", str(path), max_context_chars=1025)) == 2
    assert len(pubmedqa.load("train", str(path), max_context_chars=5000)) == 3


def test_pubmedqa_test_split_is_the_official_pubids():
    raw = read_jsonl(FIXTURES_DIR / "pubmedqa_test.jsonl")
    official = pubmedqa.official_test_pubids()
    assert len(official) == 500
    ds = pubmedqa.load("test", PUBMEDQA_FILES)
    expected = [r["final_decision"] for r in raw if r["pubid"] in official]
    assert ds["answer"] == expected and 0 < len(expected) < len(raw)
    assert "maybe" in ds["answer"]


# ---------------------------------------------------------------------------- Health_Benchmarks


def test_health_benchmarks_answer_parsing():
    q = "Which hormone?\nA) Renin\nB) Insulin\nC) Gastrin\nD) Leptin"
    cases = {
        "B": "B",
        "b": "B",
        "(C)": "C",
        "C)": "C",
        "D.": "D",
        "A: Renin": "A",
        "B) Insulin": "B",
        "Answer: D": "D",
        "The correct answer is C.": "C",
        "Option (A)": "A",
        "insulin": "B",
        "Insulin.": "B",
        "E": None,
        "A patient should rest.": None,
        "": None,
        "Leptin or renin": None,
    }
    for answer, letter in cases.items():
        assert health_benchmarks.parse_answer_letter(answer, q) == letter, answer


def test_health_benchmarks_malformed_rows_and_parsed_letters(caplog):
    path = str(TEST_FIXTURES / "health_benchmarks_Malformed.jsonl")
    with caplog.at_level(logging.WARNING, logger="data.common"):
        train = health_benchmarks.load("train", path)
        test = health_benchmarks.load("test", path)
    letters = {user_message(r).split("\n")[3]: r["answer"] for r in itertools.chain(train, test)}
    assert letters == {
        "Which organ pumps blood?": "B",
        "Which hormone lowers blood sugar?": "C",
        "Which vitamin does sunlight help make?": "A",
        "Which cell carries oxygen?": "D",
        "Which bone is in the thigh?": "C",
        "Which gland makes thyroxine?": "A",
    }
    assert len(test) == math.ceil(0.1 * 6) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("skipped 5 malformed row(s) of 11" in w for w in warnings)


def test_health_benchmarks_held_out_is_ten_percent_of_each_specialty_by_hash():
    train = health_benchmarks.load("train", HB_FILES)
    test = health_benchmarks.load("test", HB_FILES)
    train_q = {user_message(r) for r in train}
    test_q = {user_message(r) for r in test}
    assert not train_q & test_q
    files = sorted(FIXTURES_DIR.glob("health_benchmarks_*.jsonl"))
    assert len(files) >= 2 and len(test) == sum(math.ceil(0.1 * len(read_jsonl(f))) for f in files)
    # independently: per file, the ceil(10%) questions with the smallest SHA-256 are the test set
    import hashlib

    expected = set()
    for f in files:
        qs = sorted(
            {r["Questions"].strip() for r in read_jsonl(f)},
            key=lambda q: hashlib.sha256(q.encode()).hexdigest(),
        )
        expected |= {data.prompts.health_benchmarks_user_prompt(q) for q in qs[: math.ceil(0.1 * len(qs))]}
    assert test_q == expected
    # the split does not depend on row order
    shuffled = FIXTURES_DIR / "health_benchmarks_Cardiology.jsonl"
    questions = [r["Questions"] for r in read_jsonl(shuffled)]
    held_out = health_benchmarks.held_out_questions
    assert held_out(questions[::-1]) == held_out(questions)


def test_held_out_count_is_the_ceiling_of_ten_percent():
    for n, held in ((1, 1), (5, 1), (10, 1), (11, 2), (78, 8), (180, 18)):
        questions = [f"Question {i}?" for i in range(n)]
        # each question twice: duplicates count once
        assert len(health_benchmarks.held_out_questions(questions + questions)) == held


def test_health_benchmarks_rejects_split_placeholder():
    with pytest.raises(DataError, match="no '{split}'"):
        health_benchmarks.load("train", "data/fixtures/health_benchmarks_{split}.jsonl")


def test_health_benchmarks_has_the_52_recipe_specialties():
    names = health_benchmarks.SPECIALTIES
    assert len(names) == 52 == len(set(names))
    assert {"Lab_Medicine", "Wearables", "Physical_Medicine_and_Rehabilitation", "Wellbeing"} <= set(names)


# ---------------------------------------------------------------------------- the hub code path


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answering the expected (repo, config, split) calls with fixture rows."""
    calls = []
    hb_file = read_jsonl(FIXTURES_DIR / "health_benchmarks_Nutrition.jsonl")

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if path == "openai/gsm8k" and name == "main" and split in ("train", "test"):
            return datasets.Dataset.from_list(read_jsonl(FIXTURES_DIR / f"gsm8k_{split}.jsonl"))
        if path == "qiaojin/PubMedQA" and split == "train" and name in ("pqa_artificial", "pqa_labeled"):
            file = "pubmedqa_train.jsonl" if name == "pqa_artificial" else "pubmedqa_test.jsonl"
            return datasets.Dataset.from_list(read_jsonl(FIXTURES_DIR / file))
        if (
            path == "yesilhealth/Health_Benchmarks"
            and name in health_benchmarks.SPECIALTIES
            and split is None
        ):
            # every specialty gets its own rows (the name in the question keeps them distinct)
            rows = [{"Questions": f"[{name}] " + r["Questions"], "Answers": r["Answers"]} for r in hb_file]
            return datasets.DatasetDict({name: datasets.Dataset.from_list(rows)})
        raise AssertionError(f"unexpected load_dataset({path!r}, {name!r}, split={split!r})")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_hub_path_gsm8k_and_pubmedqa(fake_hub):
    assert len(gsm8k.load("test")) == len(read_jsonl(FIXTURES_DIR / "gsm8k_test.jsonl"))
    assert fake_hub[-1] == ("openai/gsm8k", "main", "test")
    ds = pubmedqa.load("train")
    assert fake_hub[-1] == ("qiaojin/PubMedQA", "pqa_artificial", "train")
    assert len(ds) == len(read_jsonl(FIXTURES_DIR / "pubmedqa_train.jsonl"))
    ds = pubmedqa.load("test")
    assert fake_hub[-1] == ("qiaojin/PubMedQA", "pqa_labeled", "train")
    assert set(ds["answer"]) == {"yes", "no", "maybe"}


def test_hub_path_matches_local_path(fake_hub, monkeypatch):
    hub = gsm8k.load("train").to_list()
    monkeypatch.undo()  # the real load_dataset for the local json files
    assert hub == gsm8k.load("train", GSM8K_FILES).to_list()


def test_hub_path_health_benchmarks_loads_every_specialty(fake_hub):
    test = health_benchmarks.load("test")
    assert sorted(c[1] for c in fake_hub) == sorted(health_benchmarks.SPECIALTIES)
    assert all(c[0] == "yesilhealth/Health_Benchmarks" for c in fake_hub)
    n = len(read_jsonl(FIXTURES_DIR / "health_benchmarks_Nutrition.jsonl"))
    assert len(test) == 52 * math.ceil(0.1 * n)
    fake_hub.clear()
    train = health_benchmarks.load("train", specialties=["Sleep", "Nutrition"])
    assert [c[1] for c in fake_hub] == ["Sleep", "Nutrition"]
    assert len(train) == 2 * (n - math.ceil(0.1 * n))


# ---------------------------------------------------------------------------- real rows (data/real)


def shared_file(name: str) -> Path:
    """A shipped file of real hub rows (the loaders must read the upstream schema exactly)."""
    return REAL_DATA / name


def test_real_gsm8k_rows():
    path = shared_file("gsm8k_train.jsonl")
    raw = read_jsonl(path)
    ds = gsm8k.load("train", str(path))
    assert len(ds) == len(raw)
    assert [user_message(r) for r in ds] == [r["question"] for r in raw]
    expected = [
        r["answer"].strip().splitlines()[-1].removeprefix("####").strip().replace(",", "") for r in raw
    ]
    assert ds["answer"] == expected
    assert {"1080", "850000", "2250"} <= set(ds["answer"])  # written "1,080", "850,000", "2,250" in the data


def test_real_pubmedqa_rows():
    path = shared_file("pubmedqa_train.jsonl")
    raw = read_jsonl(path)
    pubids = [r["pubid"] for r in raw]
    ds = pubmedqa.load("test", str(path), test_pubids=pubids)
    assert ds["answer"] == [r["final_decision"] for r in raw]
    first = user_message(ds[0])
    assert first.startswith("Given the scientific context below:\n" + raw[0]["context"]["contexts"][0] + "\n")
    assert first.endswith(
        raw[0]["question"] + " with 'yes', 'no' or 'maybe'. You need to carefully review the "
        "context and reason before answering."
    )
    # none of the training rows is an official test question, so the real test split keeps none of them
    with pytest.raises(DataError, match="not an official test pubid"):
        pubmedqa.load("test", str(path))
    # as training rows, only the contexts shorter than 1,024 characters stay
    short = [r for r in raw if len("\n".join(r["context"]["contexts"])) < 1024]
    assert pubmedqa.load("train", str(path))["answer"] == [r["final_decision"] for r in short]


# ---------------------------------------------------------------------------- prompt length filter


def test_prompt_lengths_and_filter(word_tokenizer):
    ds = gsm8k.load("test", GSM8K_FILES)
    lengths = prompt_lengths(ds["prompt"], word_tokenizer)
    assert lengths == [reference_length(p) for p in ds["prompt"]]
    limit = sorted(lengths)[len(lengths) // 2]
    kept, n_dropped = filter_long_prompts(ds, word_tokenizer, limit)
    assert n_dropped == sum(n > limit for n in lengths) > 0
    assert len(kept) == len(ds) - n_dropped
    assert max(prompt_lengths(kept["prompt"], word_tokenizer)) == limit  # "longer than" drops, equal stays
    same, zero = filter_long_prompts(ds, word_tokenizer, max(lengths))
    assert zero == 0 and len(same) == len(ds)


# ---------------------------------------------------------------------------- the mixture


def small_source(tag: str, n: int) -> datasets.Dataset:
    rows = [{"prompt": data.prompts.make_prompt(f"{tag}{i}"), "answer": "x", "db_set": tag} for i in range(n)]
    return datasets.Dataset.from_list(rows)


def test_mixture_proportions_match_the_config():
    stream = build_train_dataset(fixture_config(seed=11), tokenizer=None)
    counts = Counter(row["db_set"] for row in stream.rows(0, 3000))
    # Sources are drawn i.i.d. with these probabilities; over 3,000 draws a binomial proportion has a
    # standard deviation of at most 0.0092, so 0.03 is more than 3 standard deviations.
    for db_set, p in (("pubmedqa", 0.7), ("gsm8k", 0.15), ("med_mc", 0.15)):
        assert abs(counts[db_set] / 3000 - p) < 0.03, (db_set, counts)
    skewed = build_train_dataset(fixture_config(seed=11, dataset_mixture=[0.2, 0.2, 0.6]), tokenizer=None)
    counts = Counter(row["db_set"] for row in skewed.rows(0, 3000))
    assert abs(counts["med_mc"] / 3000 - 0.6) < 0.03 and abs(counts["pubmedqa"] / 3000 - 0.2) < 0.03


def test_mixture_is_reproducible_endless_and_indexable():
    # b is small and likely, a large and rare: an epoch must run until a is exhausted too (~100 rows)
    sources = {"a": small_source("a", 20), "b": small_source("b", 2), "c": small_source("c", 3)}
    probs = {"a": 0.2, "b": 0.6, "c": 0.2}
    stream = MixtureStream(sources, probs, seed=1)
    first = [user_message(r) for r in itertools.islice(iter(stream), 400)]  # several epochs
    assert first == [user_message(r) for r in stream.rows(0, 400)]
    assert stream.locate(399)[0] >= 2
    again = MixtureStream(sources, probs, seed=1)
    assert user_message(again[350]) == first[350]  # a resumed run jumps straight to a position
    assert first != [user_message(r) for r in MixtureStream(sources, probs, seed=2).rows(0, 400)]
    # all_exhausted: every row of every source is in every epoch
    everything = {f"{t}{i}" for t, n in (("a", 20), ("b", 2), ("c", 3)) for i in range(n)}
    for e in range(3):
        assert {user_message(r) for r in stream.epoch(e)} == everything
    # epochs are reshuffled
    assert [user_message(r) for r in stream.epoch(0)] != [user_message(r) for r in stream.epoch(1)]
    with pytest.raises(IndexError):
        stream[-1]


def test_mixture_drops_zero_probability_sources():
    stream = MixtureStream(
        {"a": small_source("a", 4), "b": small_source("b", 4)}, {"a": 1.0, "b": 0.0}, seed=0
    )
    assert {r["db_set"] for r in stream.rows(0, 50)} == {"a"}
    with pytest.raises(DataError, match="no source has a probability > 0"):
        MixtureStream({"a": small_source("a", 4)}, {"a": 0.0}, seed=0)
    cfg = fixture_config(dataset_mixture=[0.0, 1.0, 0.0], pubmedqa_data_files="/nonexistent/{split}.jsonl")
    assert {r["db_set"] for r in build_train_dataset(cfg, tokenizer=None).rows(0, 20)} == {"gsm8k"}


def test_no_eval_row_in_the_training_stream():
    cfg = fixture_config()
    evals = build_eval_datasets(cfg, tokenizer=None)
    assert set(evals) == {"pubmedqa", "gsm8k", "med_mc"} and all(len(d) > 0 for d in evals.values())
    eval_messages = {user_message(r) for d in evals.values() for r in d}
    stream = build_train_dataset(cfg, tokenizer=None)
    for name, source in stream.sources.items():  # every row of the stream comes from these
        assert not {user_message(r) for r in source} & eval_messages, name
    assert not {user_message(r) for r in stream.rows(0, 3000)} & eval_messages
    assert stream.names == list(SOURCES)


def test_overlapping_local_files_are_removed_from_training(tmp_path, caplog):
    train = read_jsonl(FIXTURES_DIR / "gsm8k_train.jsonl") + read_jsonl(FIXTURES_DIR / "gsm8k_test.jsonl")[:5]
    (tmp_path / "g_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "g_test.jsonl").write_text((FIXTURES_DIR / "gsm8k_test.jsonl").read_text())
    cfg = fixture_config(gsm8k_data_files=str(tmp_path / "g_{split}.jsonl"))
    with caplog.at_level(logging.WARNING, logger="data.mixture"):
        stream = build_train_dataset(cfg, tokenizer=None)
    assert len(stream.sources["gsm8k"]) == len(train) - 5
    assert any("removed 5 training row(s)" in r.getMessage() for r in caplog.records)
    # one file and no {split}: the training split is the test split
    same = fixture_config(gsm8k_data_files=str(FIXTURES_DIR / "gsm8k_test.jsonl"))
    with pytest.raises(DataError, match="every training row is also an evaluation row"):
        build_train_dataset(same, tokenizer=None)


def test_build_with_tokenizer_drops_long_prompts(word_tokenizer, caplog):
    all_rows = build_eval_datasets(fixture_config(), tokenizer=None)
    lengths = {k: [reference_length(p) for p in d["prompt"]] for k, d in all_rows.items()}
    limit = sorted(lengths["pubmedqa"])[len(lengths["pubmedqa"]) // 2]  # about half of PubMedQA fits
    assert max(lengths["gsm8k"]) <= limit  # GSM8K prompts are shorter
    with caplog.at_level(logging.WARNING, logger="data.mixture"):
        evals = build_eval_datasets(fixture_config(max_prompt_length=limit), word_tokenizer)
    for key, d in evals.items():
        assert len(d) == sum(n <= limit for n in lengths[key]), key
    assert len(evals["gsm8k"]) == len(all_rows["gsm8k"])
    assert 0 < len(evals["pubmedqa"]) < len(all_rows["pubmedqa"])
    assert any("pubmedqa (test): dropped" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match="every prompt is longer than max_prompt_length=5"):
        build_eval_datasets(fixture_config(max_prompt_length=5), word_tokenizer)


def test_fixtures_are_small_and_regenerate_identically(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "scripts" / "make_fixtures.py")
    make_fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_fixtures)
    make_fixtures.main(["--out", str(tmp_path)])
    shipped = sorted(p.name for p in FIXTURES_DIR.glob("*.jsonl"))
    assert shipped == sorted(p.name for p in tmp_path.glob("*.jsonl"))
    for name in shipped:
        assert (tmp_path / name).read_text() == (FIXTURES_DIR / name).read_text(), name
    assert sum((FIXTURES_DIR / n).stat().st_size for n in shipped) < 2_000_000
    assert len(read_jsonl(FIXTURES_DIR / "gsm8k_train.jsonl")) >= 200


# ---------------------------------------------------------------------------- the benchmark loaders (evaluation only)

BENCH = FIXTURES_DIR / "benchmarks"
MEDQA_FILES = str(BENCH / "medqa_{split}.jsonl")
MEDMCQA_FILES = str(BENCH / "medmcqa_{split}.jsonl")
MMLU_FILES = str(BENCH / "mmlu_*_{split}.jsonl")
INSTRUCTION = (
    "\n With 'A', 'B', 'C' or 'D'. You need to carefully review the context and reason before answering."
)


def expected_user(question: str, options: list[str]) -> str:
    lines = "\n".join(f"{letter}. {o}" for letter, o in zip("ABCD", options, strict=True))
    return f"\n\nAnswer the following question:\n{question}\n{lines}{INSTRUCTION}"


def test_medqa_rows_match_the_raw_file():
    raw = read_jsonl(BENCH / "medqa_test.jsonl")
    ds = medqa.load("test", MEDQA_FILES)
    assert ds.column_names == ["prompt", "answer", "db_set"] and len(ds) == len(raw)
    assert 20 <= len(raw) <= 40
    for got, src in zip(ds, raw, strict=True):
        options = [src[f"ending{i}"] for i in range(4)]
        assert got["prompt"] == [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": expected_user(src["sent1"], options)},
        ]
        assert got["answer"] == "ABCD"[src["label"]] and got["db_set"] == "med_mc"
    assert set(ds["answer"]) == {"A", "B", "C", "D"}


def test_medmcqa_rows_match_the_raw_file():
    raw = read_jsonl(BENCH / "medmcqa_validation.jsonl")
    ds = medmcqa.load("validation", MEDMCQA_FILES)
    assert len(ds) == len(raw) and 20 <= len(raw) <= 40
    for got, src in zip(ds, raw, strict=True):
        options = [src[k] for k in ("opa", "opb", "opc", "opd")]
        assert got["prompt"][1]["content"] == expected_user(src["question"], options)
        assert got["answer"] == "ABCD"[src["cop"]] and got["db_set"] == "med_mc"
    with pytest.raises(DataError, match="split='test' has no answers"):
        medmcqa.load("test", MEDMCQA_FILES)


def test_mmlu_medical_rows_match_the_raw_files():
    files = sorted(BENCH.glob("mmlu_*_test.jsonl"))
    assert [f.name[5:-11] for f in files] == sorted(mmlu_medical.SUBJECTS)
    raw = [r for f in files for r in read_jsonl(f)]
    ds = mmlu_medical.load("test", MMLU_FILES)
    assert len(ds) == len(raw)
    for got, src in zip(ds, raw, strict=True):
        assert got["prompt"][1]["content"] == expected_user(src["question"], src["choices"])
        assert got["answer"] == "ABCD"[src["answer"]]
    # asking for two subjects leaves the rows of the other four out
    two = mmlu_medical.load("test", MMLU_FILES, subjects=["anatomy", "medical_genetics"])
    assert len(two) == sum(1 for r in raw if r["subject"] in ("anatomy", "medical_genetics"))


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


MEDQA_GOOD = {
    "id": "x",
    "sent1": "Q?",
    "sent2": "",
    "ending0": "a",
    "ending1": "b",
    "ending2": "c",
    "ending3": "d",
    "label": 2,
}


@pytest.mark.parametrize(
    ("module", "good", "bad_rows", "reasons"),
    [
        (
            medqa,
            MEDQA_GOOD,
            [{**MEDQA_GOOD, "label": 4}, {**MEDQA_GOOD, "label": True}, {**MEDQA_GOOD, "sent1": " "},
             {**MEDQA_GOOD, "ending3": ""}, {k: v for k, v in MEDQA_GOOD.items() if k != "label"}],
            ["label out of range 0-3: 1", "label is not an option index 0-3: 2", "empty sent1: 1",
             "ending3 missing, empty or not a string: 1"],
        ),
        (
            medmcqa,
            {"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1, "exp": None},
            [{"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": -1},
             {"question": None, "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0},
             {"question": "Q?", "opa": "a", "opb": 5, "opc": "c", "opd": "d", "cop": 0}],
            ["cop out of range 0-3: 1", "question missing or not a string: 1", "opb missing, empty or not a string: 1"],
        ),
        (
            mmlu_medical,
            {"question": "Q?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 3},
            [{"question": "Q?", "subject": "anatomy", "choices": ["a", "b", "c"], "answer": 0},
             {"question": "Q?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": "7"},
             {"question": "Q?", "subject": "anatomy", "choices": ["a", "", "c", "d"], "answer": 0}],
            ["choices is not a list of 4 options: 1", "answer out of range 0-3: 1", "choices[1] missing, empty or not a string: 1"],
        ),
    ],
)  # fmt: skip
def test_malformed_rows_are_skipped_with_one_warning(module, good, bad_rows, reasons, tmp_path, caplog):
    split = module.EVAL_SPLIT
    path = write_jsonl(tmp_path / f"rows_{split}.jsonl", [good, *bad_rows, good])
    with caplog.at_level(logging.WARNING, logger="data.common"):
        ds = module.load(split, path)
    assert len(ds) == 2
    letter = "ABCD"[good.get("label", good.get("cop", good.get("answer")))]
    assert ds["answer"] == [letter, letter]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"skipped {len(bad_rows)} malformed row(s) of {len(bad_rows) + 2}" in warnings[0]
    for reason in reasons:
        assert reason in warnings[0]
    with pytest.raises(DataError, match=rf"no valid row left in .*bad_{split}\.jsonl"):
        module.load(split, write_jsonl(tmp_path / f"bad_{split}.jsonl", bad_rows))


def test_label_forms():
    assert [medqa.label_to_letter(v, "label") for v in (0, 1, 2, 3, "2", " 3 ", "c")] == list("ABCDCDC")


def install_fake_hub(monkeypatch) -> list:
    """datasets.load_dataset answering the benchmark hub ids with the fixture rows; returns the calls."""
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if path == medqa.REPO and name is None and split == "test":
            return datasets.Dataset.from_list(read_jsonl(BENCH / "medqa_test.jsonl"))
        if path == medmcqa.REPO and name is None and split == "validation":
            return datasets.Dataset.from_list(read_jsonl(BENCH / "medmcqa_validation.jsonl"))
        if path == mmlu_medical.REPO and name in mmlu_medical.SUBJECTS and split == "test":
            return datasets.Dataset.from_list(read_jsonl(BENCH / f"mmlu_{name}_test.jsonl"))
        raise AssertionError(f"unexpected load_dataset({path!r}, {name!r}, split={split!r})")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_hub_path_of_the_three_benchmarks(monkeypatch):
    local = {  # read before the hub is faked: local files go through datasets.load_dataset("json") too
        "medqa": medqa.load("test", MEDQA_FILES).to_list(),
        "medmcqa": medmcqa.load("validation", MEDMCQA_FILES).to_list(),
        "mmlu_medical": mmlu_medical.load("test", MMLU_FILES).to_list(),
    }
    calls = install_fake_hub(monkeypatch)
    assert medqa.load().to_list() == local["medqa"]
    assert calls == [("GBaker/MedQA-USMLE-4-options-hf", None, "test")]
    assert medmcqa.load().to_list() == local["medmcqa"]
    assert calls[-1] == ("openlifescienceai/medmcqa", None, "validation")
    calls.clear()
    ds = mmlu_medical.load()
    assert calls == [("cais/mmlu", s, "test") for s in mmlu_medical.SUBJECTS]
    # the hub order is SUBJECTS; the local glob is alphabetical: the same rows either way
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, ds.to_list())) == sorted(map(key, local["mmlu_medical"]))


def test_unreachable_hub_names_the_data_files_flag(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataError, match=r"medmcqa: cannot load openlifescienceai/medmcqa.* --medmcqa_data_files"
    ):
        load_eval_set("medmcqa", GRPOConfig())
    with pytest.raises(DataError, match=r"gsm8k: cannot load .*ConnectionError.* --gsm8k_data_files"):
        load_eval_set("gsm8k", GRPOConfig())
    with pytest.raises(DataError, match="unknown source 'medqa2'"):
        load_eval_set("medqa2", GRPOConfig())


def test_evenly_spaced_limit():
    assert evenly_spaced(10, 4) == [0, 2, 5, 7]
    assert evenly_spaced(3, 10) == [0, 1, 2] and evenly_spaced(3, None) == [0, 1, 2]


# ---------------------------------------------------------------------------- unreadable files: one error naming file and line

import data.common  # noqa: E402
import data.custom  # noqa: E402
from data import custom  # noqa: E402
from data.common import find_json_problem, read_local_files  # noqa: E402
from data.prompts import make_prompt  # noqa: E402

GOOD_GSM8K = {"question": "Q?", "answer": "1 + 1 = 2\n#### 2"}


def test_docstring_examples_of_file_checks_and_custom_rows():
    for module in (data.common, data.custom):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_a_broken_json_line_is_one_error_naming_the_file_and_the_line(tmp_path):
    good = json.dumps(GOOD_GSM8K)
    path = tmp_path / "gsm8k_train.jsonl"
    path.write_text(f'{good}\n{good}\n\n{{"question": "Q?", "answer": \n{good}\n')  # line 4 is cut
    with pytest.raises(DataError) as err:
        gsm8k.load("train", str(path))
    message = str(err.value)
    assert message.startswith(f"gsm8k: could not read {path}: line 4: not valid JSON (")
    assert "\n" not in message


def test_a_line_that_is_not_an_object_names_its_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD_GSM8K) + '\n["Q?", "#### 2"]\n')
    with pytest.raises(DataError, match=r"rows\.jsonl: line 2: an array, expected one JSON object per line"):
        gsm8k.load("train", str(path))


def test_a_json_array_file_names_the_line_of_its_syntax_error(tmp_path):
    path = tmp_path / "rows.json"
    rows = json.dumps([GOOD_GSM8K, GOOD_GSM8K], indent=1).splitlines()  # "[", " {", ... one key per line
    rows[2] = rows[2].rstrip(",")  # line 3 loses the comma between two keys: the parser stops on line 4
    path.write_text("\n".join(rows))
    with pytest.raises(DataError, match=r"rows\.json: line 4: not valid JSON \(Expecting ',' delimiter"):
        gsm8k.load("train", str(path))
    # and the same rows, well written, as an array and as JSON Lines, read alike
    path.write_text(json.dumps([GOOD_GSM8K, GOOD_GSM8K], indent=1))
    assert gsm8k.load("train", str(path))["answer"] == ["2", "2"]


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_an_empty_data_file_is_one_error_naming_it(tmp_path, text):
    path = tmp_path / "gsm8k_train.jsonl"
    path.write_text(text)
    with pytest.raises(
        DataError, match=rf"^gsm8k: could not read {re.escape(str(path))}: the file is empty$"
    ):
        gsm8k.load("train", str(path))


def test_an_empty_file_among_good_ones_adds_no_row(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [GOOD_GSM8K])
    (tmp_path / "b.jsonl").write_text("")
    assert len(gsm8k.load("train", str(tmp_path / "*.jsonl"))) == 1


def test_missing_file_glob_and_empty_folder_are_one_error_each(tmp_path):
    with pytest.raises(
        DataError, match=r"^gsm8k: no data file matches '.*nothing_train\.jsonl' \(split 'train'\)$"
    ):
        gsm8k.load("train", str(tmp_path / "nothing_{split}.jsonl"))
    with pytest.raises(DataError, match=r"no data file matches '.*\*\.parquet'"):
        gsm8k.load("train", str(tmp_path / "*.parquet"))
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(
        DataError, match=r"the folder '.*empty_folder' holds no \.json/\.jsonl/\.parquet file"
    ):
        gsm8k.load("train", str(tmp_path / "empty_folder"))


def test_all_rows_bad_lists_each_reason_with_its_first_row(tmp_path):
    path = write_jsonl(
        tmp_path / "gsm8k_train.jsonl",
        [{"question": "Q?", "answer": "no marker"}, {"question": "", "answer": "#### 1"},
         {"question": "Q?", "answer": "no marker either"}],
    )  # fmt: skip
    with pytest.raises(DataError) as err:
        gsm8k.load("train", path)
    assert str(err.value) == (
        f"gsm8k: no valid row left in {path} (3 row(s) read; malformed: no '####' line in answer: 2 "
        "(first at row 0); empty question: 1 (first at row 1); left out: none)"
    )


def test_datasets_own_error_log_is_held_back(tmp_path, caplog):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "Q?", "answer": "#### 1"}\n{"question": \n')
    with caplog.at_level(logging.DEBUG), pytest.raises(DataError):
        read_local_files([str(path)], source="gsm8k")
    assert not [r for r in caplog.records if r.name.startswith("datasets") and r.levelno >= logging.ERROR]
    assert logging.getLogger("datasets").level != logging.CRITICAL  # restored afterwards


def test_good_files_are_not_checked_a_second_time(monkeypatch):
    def must_not_run(file):
        raise AssertionError(f"find_file_problem({file}) on a file datasets read")

    monkeypatch.setattr(data.common, "find_file_problem", must_not_run)
    assert len(gsm8k.load("test", GSM8K_FILES)) == len(read_jsonl(FIXTURES_DIR / "gsm8k_test.jsonl"))


def test_find_json_problem_cases():
    assert find_json_problem('{"a": 1}\n{"a": 2}\n') is None
    assert find_json_problem('{\n  "a": 1\n}\n') is None  # one object over several lines
    assert find_json_problem('{"a": 1}\n"text"\n') == "line 2: a string, expected one JSON object per line"
    assert find_json_problem("[]") == "the file is an empty array (no rows)"
    assert find_json_problem('{"a": 1}\n{"a": 1},\n') == "line 2: not valid JSON (Extra data, column 9)"


@pytest.mark.parametrize(
    ("module", "args", "where", "flag"),
    [
        (gsm8k, ("train",), "openai/gsm8k (main), split train", "--gsm8k_data_files"),
        (pubmedqa, ("test",), "qiaojin/PubMedQA (pqa_labeled), split train", "--pubmedqa_data_files"),
        (health_benchmarks, ("train",), "yesilhealth/Health_Benchmarks (Lab_Medicine)",
         "--health_benchmarks_data_files"),
        (medqa, ("test",), "GBaker/MedQA-USMLE-4-options-hf, split test", "--medqa_data_files"),
        (mmlu_medical, ("test",), "cais/mmlu (anatomy), split test", "--mmlu_medical_data_files"),
    ],
)  # fmt: skip
def test_unreachable_hub_is_one_error_naming_the_local_files_flag(module, args, where, flag, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\n(second line of the library's message)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        module.load(*args)
    assert str(err.value) == (
        f"{module.DB_SET if module is gsm8k else module.__name__.split('.')[-1]}: cannot load {where} from the "
        f"hub (ConnectionError: Couldn't reach the Hub); offline, give local files in its hub schema with {flag}"
    )


# ---------------------------------------------------------------------------- a user's own dataset (data/custom.py)

SYSTEM = {"role": "system", "content": data.prompts.SYSTEM_PROMPT}


def test_custom_rows_conversational_plain_and_own_system_prompt(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "2 + 2?"}], "answer": "4"},
        {"prompt": "Is water wet?", "answer": "yes", "db_set": "pubmedqa"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Pick one."}],
         "answer": " B ", "db_set": "med_mc", "extra": 1},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "7 * 6?"}], "answer": 42},
    ]  # fmt: skip
    ds = custom.load("train", write_jsonl(tmp_path / "mine.jsonl", rows))
    assert ds.column_names == ["prompt", "answer", "db_set"]
    assert ds.to_list() == [
        {"prompt": make_prompt("2 + 2?"), "answer": "4", "db_set": "custom"},
        {"prompt": make_prompt("Is water wet?"), "answer": "yes", "db_set": "pubmedqa"},
        {"prompt": rows[2]["prompt"], "answer": "B", "db_set": "med_mc"},
        {"prompt": [SYSTEM, *rows[3]["prompt"]], "answer": "42", "db_set": "custom"},
    ]
    assert custom.load("train", str(tmp_path / "mine.jsonl"), db_set="mine")["db_set"][0] == "mine"


def test_custom_csv_parquet_and_jsonl_give_the_same_rows(tmp_path):
    rows = [{"prompt": "What is 3 + 4?", "answer": 7}, {"prompt": "Capital of France?", "answer": "Paris"}]
    jsonl = custom.load("train", write_jsonl(tmp_path / "a.jsonl", rows)).to_list()
    (tmp_path / "a.csv").write_text('prompt,answer\nWhat is 3 + 4?,7\n"Capital of France?",Paris\n')
    datasets.Dataset.from_list(
        [{"prompt": r["prompt"], "answer": str(r["answer"])} for r in rows]
    ).to_parquet(str(tmp_path / "a.parquet"))
    assert jsonl == [
        {"prompt": make_prompt("What is 3 + 4?"), "answer": "7", "db_set": "custom"},
        {"prompt": make_prompt("Capital of France?"), "answer": "Paris", "db_set": "custom"},
    ]
    assert custom.load("train", str(tmp_path / "a.csv")).to_list() == jsonl
    assert custom.load("train", str(tmp_path / "a.parquet")).to_list() == jsonl


def test_custom_splits_from_the_split_placeholder(tmp_path):
    write_jsonl(tmp_path / "rows_train.jsonl", [{"prompt": "t?", "answer": "1"}])
    write_jsonl(
        tmp_path / "rows_test.jsonl", [{"prompt": "e?", "answer": "2"}, {"prompt": "f?", "answer": "3"}]
    )
    pattern = str(tmp_path / "rows_{split}.jsonl")
    assert custom.load("train", pattern)["answer"] == ["1"]
    assert custom.load("test", pattern)["answer"] == ["2", "3"]
    with pytest.raises(
        DataError, match=r"^dataset_name: '.*rows_train\.jsonl' has no '\{split\}' in it, so it "
    ):
        custom.load("test", str(tmp_path / "rows_train.jsonl"))
    with pytest.raises(DataError, match=r"dataset_name: no data file matches '.*rows_validation\.jsonl'"):
        custom.load("validation", pattern)


def test_custom_missing_column_names_the_file_and_its_columns(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "1"}])
    with pytest.raises(DataError) as err:
        custom.load("train", path)
    assert str(err.value).startswith(
        f"dataset_name: {path}: no 'prompt' column (its columns: question, answer);"
    )


def test_custom_malformed_rows_skipped_with_one_warning_naming_column_and_row(tmp_path, caplog):
    good = {"prompt": "Q?", "answer": "A"}
    bad = [
        {"prompt": "", "answer": "A"},
        {"prompt": [], "answer": "A"},
        {"prompt": [{"role": "user"}], "answer": "A"},
        {"prompt": [{"role": "robot", "content": "x"}], "answer": "A"},
        {"prompt": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}], "answer": "A"},
        {"prompt": "Q?", "answer": ""},
        {"prompt": "Q?", "answer": None},
        {"prompt": "Q?", "answer": "A", "db_set": " "},
    ]
    path = write_jsonl(tmp_path / "mine.jsonl", [good, *bad])
    with caplog.at_level(logging.WARNING, logger="data.common"):
        assert len(custom.load("train", path)) == 1
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"dataset_name: skipped 8 malformed row(s) of 9 in {path} [")
    for reason_and_row in [
        "prompt is an empty string: 1 (first at row 1)",
        "prompt is an empty list of messages: 1 (first at row 2)",
        "prompt: a message is not a {role, content} object: 1 (first at row 3)",
        "prompt: a message has a role other than system, user, assistant: 1 (first at row 4)",
        "prompt: the last message is not from the user (the model answers it): 1 (first at row 5)",
        "answer is empty: 1 (first at row 6)",
        "answer missing (null): 1 (first at row 7)",
        "db_set is not a non-empty string: 1 (first at row 8)",
    ]:
        assert reason_and_row in warning
    with pytest.raises(
        DataError, match=r"^dataset_name: no valid row left in .*bad\.jsonl \(2 row\(s\) read"
    ):
        custom.load("train", write_jsonl(tmp_path / "bad.jsonl", bad[:2]))


def test_custom_hub_dataset_and_its_errors(monkeypatch, tmp_path):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if path == "someone/qa":
            return datasets.Dataset.from_list([{"prompt": "Q?", "answer": "A"}])
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)  # no local folder "someone/qa"
    assert custom.load("test", "someone/qa", config_name="v2").to_list() == [
        {"prompt": make_prompt("Q?"), "answer": "A", "db_set": "custom"}
    ]
    assert calls == [("someone/qa", "v2", "test")]
    with pytest.raises(DataError) as err:
        custom.load("train", "someone/missing")
    assert str(err.value) == (
        "dataset_name: cannot load someone/missing, split train from the hub (ConnectionError: Couldn't reach "
        "the Hub); no local file or folder of that name exists either"
    )
    with pytest.raises(DataError, match="only applies to a hub dataset"):
        custom.load("train", "rows.jsonl", config_name="v2")


def test_custom_is_local_and_split_by_db_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_data").mkdir()
    assert custom.is_local("my_data") and custom.is_local("~/x") and custom.is_local("x_{split}")
    assert not custom.is_local("org/name") and not custom.is_local("my_dataset")
    ds = datasets.Dataset.from_list(
        [
            {"prompt": make_prompt(q), "answer": "1", "db_set": d}
            for q, d in [("a", "x"), ("b", "gsm8k"), ("c", "x")]
        ]
    )
    parts = custom.split_by_db_set(ds)
    assert list(parts) == ["gsm8k", "x"]
    assert [r["prompt"][1]["content"] for r in parts["x"]] == ["a", "c"]
    assert [r["prompt"][1]["content"] for r in parts["gsm8k"]] == ["b"]
