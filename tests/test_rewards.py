"""The five reward functions, answer extraction and combine_rewards (rewards/): None as "does not apply",
async and thread-safe functions run concurrently with the sequential results, failures named on one line."""

from __future__ import annotations

import asyncio
import doctest
import functools
import math
import random
import re
import threading
import time

import pytest
import torch

import rewards.answer
import rewards.format
import rewards.length
import rewards.parsing
import rewards.registry
import rewards.running
from grpo.config import REWARD_FUNC_NAMES
from rewards import (
    OPTIONAL_REWARD_FUNCS,
    REWARD_FUNCS,
    RewardFuncError,
    combine_rewards,
    correctness_reward_func,
    count_xml,
    extract_answer,
    int_reward_func,
    overlong_penalty,
    resolve_reward_func,
    soft_format_reward_func,
    soft_overlong_punishment,
    soft_overlong_punishment_reward_func,
    strict_format_reward_func,
    xmlcount_reward_func,
)

PERFECT = "<reasoning>\nr\n</reasoning>\n<answer>\n7\n</answer>\n"


def one(func, completion, answer="7", db_set="gsm8k") -> float:
    (value,) = func([completion], answer=[answer], db_set=[db_set])
    return value


def correctness(predicted: str, gold: str, db_set: str) -> float:
    return one(correctness_reward_func, f"<answer>{predicted}</answer>", gold, db_set)


def int_reward(predicted: str, db_set: str) -> float:
    return one(int_reward_func, f"<answer>{predicted}</answer>", "", db_set)


def test_registry_matches_the_config_names():
    assert tuple(REWARD_FUNCS) == REWARD_FUNC_NAMES
    assert all(f.__name__ == name for name, f in REWARD_FUNCS.items())


def test_docstring_examples():
    modules = (
        rewards.parsing,
        rewards.answer,
        rewards.format,
        rewards.length,
        rewards.registry,
        rewards.running,
    )
    for module in modules:
        assert doctest.testmod(module).failed == 0, module.__name__


# ---------------------------------------------------------------------------- xmlcount


def test_xmlcount_perfect_completion_is_half():
    # "\n</answer>\n" is followed by "" (0 chars); "\n</answer>" by "\n" (1 char, minus 1 = 0): no penalty.
    assert one(xmlcount_reward_func, PERFECT) == pytest.approx(0.5)


def test_xmlcount_trailing_text_penalty():
    # after the last "\n</answer>\n": "xyz" (3 chars) -> -0.003
    # after the last "\n</answer>": "\nxyz" (4 chars) -> -(4 - 1) * 0.001 = -0.003
    assert one(xmlcount_reward_func, PERFECT + "xyz") == pytest.approx(0.5 - 0.003 - 0.003)
    # 1,000 trailing characters: -1.0 and -1.0 -> 0.5 - 2.0
    assert one(xmlcount_reward_func, PERFECT + "x" * 1000) == pytest.approx(-1.5)


def test_xmlcount_without_final_newline():
    text = "<reasoning>\nr\n</reasoning>\n<answer>\n7\n</answer>"
    assert len(text) == 12 + 2 + 13 + 9 + 2 + 9 == 47
    # "\n</answer>\n" never occurs, so (str.split semantics) the text after it is the whole text: -0.047;
    # "\n</answer>" is followed by "" -> -(0 - 1) * 0.001 = +0.001.
    assert one(xmlcount_reward_func, text) == pytest.approx(0.5 - 0.047 + 0.001)


def test_xmlcount_each_tag_counts_once():
    assert one(xmlcount_reward_func, "") == 0.0
    assert one(xmlcount_reward_func, "<reasoning>\n") == pytest.approx(0.125)
    assert one(xmlcount_reward_func, "<reasoning>\n<reasoning>\n") == 0.0  # twice: no credit
    assert one(xmlcount_reward_func, "\n<answer>\n7\n</answer>\n") == pytest.approx(0.25)
    doubled = "<reasoning>\n<reasoning>\nr\n</reasoning>\n<answer>\n7\n</answer>\n"
    assert one(xmlcount_reward_func, doubled) == pytest.approx(0.375)
    # "\n</answer>" alone at the end: +0.125 + 0.001 (nothing after it, minus 1)
    assert one(xmlcount_reward_func, "x\n</answer>") == pytest.approx(0.126)
    # two answers: "\n<answer>\n" and "\n</answer>" both occur twice -> only the reasoning tags count
    assert one(xmlcount_reward_func, PERFECT + "\n<answer>\n8\n</answer>\n") == pytest.approx(0.25)


# ---------------------------------------------------------------------------- soft and strict format


def test_soft_format():
    assert one(soft_format_reward_func, PERFECT) == 0.5
    assert one(soft_format_reward_func, "<reasoning>a</reasoning> <answer>b</answer> and more text") == 0.5
    assert (
        one(soft_format_reward_func, "<reasoning>line 1\nline 2</reasoning>\n\n<answer>\nb\n</answer>") == 0.5
    )
    # re.match: the layout must start the completion
    assert one(soft_format_reward_func, "Sure! <reasoning>a</reasoning><answer>b</answer>") == 0.0
    assert one(soft_format_reward_func, "<answer>b</answer><reasoning>a</reasoning>") == 0.0
    assert one(soft_format_reward_func, "<reasoning>a</reasoning> x <answer>b</answer>") == 0.0
    assert one(soft_format_reward_func, "<reasoning>a</reasoning><answer>b") == 0.0


def test_strict_format():
    assert one(strict_format_reward_func, PERFECT) == 0.5
    assert (
        one(strict_format_reward_func, "<reasoning>\nline 1\nline 2\n</reasoning>\n<answer>\nB\n</answer>\n")
        == 0.5
    )
    assert one(strict_format_reward_func, PERFECT[:-1]) == 0.0  # no final newline
    assert one(strict_format_reward_func, PERFECT + "x") == 0.0
    assert one(strict_format_reward_func, " " + PERFECT) == 0.0
    assert one(strict_format_reward_func, "<reasoning>r</reasoning>\n<answer>7</answer>\n") == 0.0
    assert one(strict_format_reward_func, "<reasoning>\nr\n</reasoning>\n\n<answer>\n7\n</answer>\n") == 0.0
    # the reference pattern ends in "\n$", and "$" also matches before one final newline:
    assert one(strict_format_reward_func, PERFECT + "\n") == 0.5


# ---------------------------------------------------------------------------- answer extraction


def test_extract_answer():
    assert extract_answer(PERFECT) == "7"
    assert extract_answer("<answer>A</answer> then <answer> B </answer>") == "B"  # the last one
    assert extract_answer("<answer>\nyes, cut off here") == "yes, cut off here"  # no closing tag: the rest
    assert extract_answer("<answer><answer>5</answer></answer>") == "5"
    assert extract_answer("no tags at all: 7") == ""  # no <answer>: no answer
    assert extract_answer("</answer>7<answer>") == ""
    assert extract_answer("") == "" and extract_answer(None) == ""
    assert extract_answer([{"role": "assistant", "content": PERFECT}]) == "7"


# ---------------------------------------------------------------------------- int_reward_func


def test_int_reward_gsm8k():
    for good in ("42", "-3", "+7", "1,080", "0", "1,234,567"):
        assert int_reward(good, "gsm8k") == 0.5, good
    for bad in ("3.5", "18 dollars", "$18", "1,08", "", "seven", "4 2", "- 3"):
        assert int_reward(bad, "gsm8k") == 0.0, bad


def test_int_reward_pubmedqa_and_mc():
    for good in ("yes", "No", "MAYBE"):
        assert int_reward(good, "pubmedqa") == 0.5, good
    for bad in ("yes.", "probably", "yes or no", "", "nope"):
        assert int_reward(bad, "pubmedqa") == 0.0, bad
    for good in ("A", "b", "D"):
        assert int_reward(good, "med_mc") == 0.5, good
    for bad in ("E", "B)", "AB", "", "The answer is B"):
        assert int_reward(bad, "med_mc") == 0.0, bad
    assert int_reward("7", "unknown_set") == 0.0


# ---------------------------------------------------------------------------- correctness_reward_func


def test_correctness_gsm8k():
    assert correctness("18", "18", "gsm8k") == 2.0
    for predicted, gold in (
        ("$18", "18"),
        ("18.", "18"),
        ("18.0", "18"),
        (" 18 ", "18"),
        ("$1,080.", "1080"),
        ("1080", "1080"),
        ("2.50", "2.5"),
    ):
        assert correctness(predicted, gold, "gsm8k") == 2.0, predicted
    assert correctness("-7", "-7", "gsm8k") == 2.0
    assert correctness("7", "-7", "gsm8k") == 0.0
    assert correctness("19", "18", "gsm8k") == 0.0
    # partial: the gold is the only number standing in the answer
    assert correctness("18 dollars", "18", "gsm8k") == 1.0
    assert correctness("She has $1,080 left", "1080", "gsm8k") == 1.0
    assert correctness("18 dollars, so 18", "18", "gsm8k") == 1.0  # the same number twice is fine
    assert correctness("-5 degrees", "-5", "gsm8k") == 1.0
    assert correctness("18 - 2 = 16", "16", "gsm8k") == 0.0  # other numbers too
    assert correctness("118 apples", "18", "gsm8k") == 0.0  # not standalone
    assert correctness("x18 apples", "18", "gsm8k") == 0.0
    assert correctness("eighteen", "18", "gsm8k") == 0.0


def test_correctness_pubmedqa():
    assert correctness("yes", "yes", "pubmedqa") == 2.0
    assert correctness("Yes", "yes", "pubmedqa") == 2.0
    assert correctness("MAYBE", "maybe", "pubmedqa") == 2.0
    assert correctness("no", "yes", "pubmedqa") == 0.0
    assert correctness("maybe, the evidence is mixed", "maybe", "pubmedqa") == 1.0
    assert correctness("Yes.", "yes", "pubmedqa") == 2.0  # trailing punctuation: as "18." in gsm8k
    assert correctness("yes or no", "yes", "pubmedqa") == 0.0  # another label too
    assert correctness("no, maybe", "maybe", "pubmedqa") == 0.0
    assert correctness("yesterday", "yes", "pubmedqa") == 0.0  # not a standalone word
    assert correctness("There is no evidence", "no", "pubmedqa") == 1.0


def test_correctness_multiple_choice():
    assert correctness("B", "B", "med_mc") == 2.0
    assert correctness("b", "B", "med_mc") == 2.0
    assert correctness("C", "B", "med_mc") == 0.0
    assert correctness("The answer is B", "B", "med_mc") == 1.0
    assert correctness("B) Insulin", "B", "med_mc") == 1.0
    assert correctness("(B) Vitamin C", "B", "med_mc") == 1.0  # the leading option label decides
    assert correctness("C) Vitamin B", "B", "med_mc") == 0.0
    assert correctness("B or C", "B", "med_mc") == 0.0
    assert correctness("Both", "B", "med_mc") == 0.0  # "B" inside a word is not a token


def test_correctness_needs_a_closing_or_opening_tag_to_read_an_answer():
    assert one(correctness_reward_func, "the answer is 7", "7") == 0.0  # no <answer>: nothing read
    assert one(correctness_reward_func, "<answer>\n7", "7") == 2.0  # cut before </answer>: the rest


# ---------------------------------------------------------------------------- robustness


ADVERSARIAL = [
    "",
    " ",
    "\n",
    None,
    7,
    3.5,
    b"bytes",
    {"content": None},
    [{"role": "assistant"}],
    [None],
    [],
    "<answer>",
    "</answer>",
    "<answer></answer>",
    "</answer><answer>",
    "<reasoning>",
    "\x00" * 10,
    "<answer>" * 1000,
    "\n</answer>\n" * 50,
    "<answer>" + "9" * 5000 + "</answer>",
    "<answer>1e400</answer>",
    "<answer>NaN</answer>",
    "<answer>inf</answer>",
    "<answer>٣</answer>",
    "<answer>🙂</answer>",
    "<answer>" + "-" * 100 + "</answer>",
    "<answer>1,2,3,4</answer>",
    "<answer>(((</answer>",
    "<answer>\\d+[</answer>",
    "<answer>$</answer>",
    "<answer>.</answer>",
    "<answer>+</answer>",
]


def random_completions(n: int, seed: int = 0) -> list[str]:
    """Deterministic random strings made of tag fragments, numbers, labels and noise."""
    pieces = [
        "<reasoning>",
        "</reasoning>",
        "<answer>",
        "</answer>",
        "\n",
        " ",
        "yes",
        "no",
        "maybe",
        "A",
        "B)",
        "(C)",
        "D",
        "18",
        "-3",
        "1,080",
        "$",
        ".",
        ",",
        "x",
        "The answer is ",
        "\t",
        "<",
        ">",
    ]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(n)]


@pytest.mark.parametrize("db_set", ["gsm8k", "pubmedqa", "med_mc", "other", None])
def test_no_reward_raises_and_values_stay_in_range(db_set):
    completions = ADVERSARIAL + random_completions(400)
    n = len(completions)
    golds = ["18", "yes", "B", None, "", "-3"] * (n // 6) + ["18"] * (n % 6)
    columns = {"answer": golds, "db_set": [db_set] * n, "prompts": [None] * n}
    allowed = {
        "soft_format_reward_func": {0.0, 0.5},
        "strict_format_reward_func": {0.0, 0.5},
        "int_reward_func": {0.0, 0.5},
        "correctness_reward_func": {0.0, 1.0, 2.0},
    }
    for name, func in REWARD_FUNCS.items():
        values = func(completions, **columns)
        assert len(values) == n and all(isinstance(v, float) and math.isfinite(v) for v in values), name
        if name in allowed:
            assert set(values) <= allowed[name], name
        else:
            assert max(values) <= 0.5, name


def test_string_and_conversational_completions_score_the_same():
    texts = [PERFECT, "<answer>18 dollars</answer>", "garbage", ""]
    conversational = [[{"role": "assistant", "content": t}] for t in texts]
    columns = {"answer": ["7", "18", "7", "7"], "db_set": ["gsm8k"] * 4}
    for name, func in REWARD_FUNCS.items():
        assert func(texts, **columns) == func(conversational, **columns), name


def test_missing_or_mismatched_columns_are_clear_errors():
    with pytest.raises(ValueError, match="needs the dataset column 'answer'"):
        correctness_reward_func([PERFECT], db_set=["gsm8k"])
    with pytest.raises(ValueError, match="needs the dataset column 'db_set'"):
        int_reward_func([PERFECT], answer=["7"])
    with pytest.raises(ValueError, match="2 completions but 1 'answer' entries"):
        correctness_reward_func([PERFECT, PERFECT], answer=["7"], db_set=["gsm8k", "gsm8k"])


# ---------------------------------------------------------------------------- combine_rewards


def test_combine_rewards_totals_and_weights():
    completions = [PERFECT, "<answer>18 dollars</answer>", "nothing"]
    columns = {"answer": ["7", "18", "yes"], "db_set": ["gsm8k", "gsm8k", "pubmedqa"]}
    total, per_func = combine_rewards(completions, columns)
    assert list(per_func) == list(REWARD_FUNC_NAMES)
    # PERFECT: 0.5 + 0.5 + 0.5 + 0.5 + 2.0 = 4.0, the maximum with weights 1.0
    # "<answer>18 dollars</answer>": no format credit, not an integer, partial correctness 1.0
    assert torch.allclose(total, torch.tensor([4.0, 1.0, 0.0]))
    assert per_func["correctness_reward_func"].tolist() == [2.0, 1.0, 0.0]
    assert total.dtype == torch.float32 and total.shape == (3,)

    weights = [0.0, 0.0, 0.0, 2.0, 0.5]
    total, _ = combine_rewards(completions, columns, weights=weights)
    assert torch.allclose(total, torch.tensor([2.0 * 0.5 + 0.5 * 2.0, 0.5 * 1.0, 0.0]))

    total, per_func = combine_rewards(
        completions, columns, funcs=["int_reward_func", correctness_reward_func]
    )
    assert list(per_func) == ["int_reward_func", "correctness_reward_func"]
    assert torch.allclose(total, torch.tensor([2.5, 1.0, 0.0]))


def test_combine_rewards_errors():
    with pytest.raises(ValueError, match="unknown reward function 'nope'"):
        combine_rewards([PERFECT], {"answer": ["7"], "db_set": ["gsm8k"]}, funcs=["nope"])
    with pytest.raises(ValueError, match="2 reward weights for 5 reward functions"):
        combine_rewards([PERFECT], {"answer": ["7"], "db_set": ["gsm8k"]}, weights=[1.0, 1.0])

    def broken(completions, **columns):
        return [1.0]

    with pytest.raises(ValueError, match=r"'broken' returned 1 values for a batch of 2 completions \(row 0"):
        combine_rewards([PERFECT, PERFECT], {"answer": ["7", "7"], "db_set": ["gsm8k"] * 2}, funcs=[broken])


# ---------------------------------------------------------------------------- format rewards = the reference
# The reference definitions, written here independently of rewards/format.py: the regular expressions of
# the recipe (quadratic on some inputs, fine on short strings) and count_xml with re instead of str.count/split.

REFERENCE_SOFT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
REFERENCE_STRICT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$", re.DOTALL)


def after_last(text: str, separator: str) -> str:
    """What follows the last of the non-overlapping, left-to-right occurrences of separator (the whole
    text when there is none): str.split's last piece, found here with re.finditer instead."""
    ends = [m.end() for m in re.finditer(re.escape(separator), text)]
    return text[ends[-1] :] if ends else text


def reference_count_xml(text: str) -> float:
    """The recipe's count_xml: 0.125 per tag found exactly once, minus 0.001 per character after the answer."""
    tags = ["<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>"]
    found = [len(re.findall(re.escape(tag), text)) == 1 for tag in tags]
    score = 0.125 * sum(found)
    if found[2]:
        score -= len(after_last(text, "\n</answer>\n")) * 0.001
    if found[3]:
        score -= (len(after_last(text, "\n</answer>")) - 1) * 0.001
    return score


# The tag alphabet: whole tags, their parts, the layout's separators, and every kind of whitespace that
# "\s" matches (Unicode ones too) or does not (a zero-width space).
TAG_ALPHABET = [
    "<reasoning>",
    "</reasoning>",
    "<answer>",
    "</answer>",
    "<reasoning>\n",
    "\n</reasoning>\n<answer>\n",
    "\n</answer>\n",
    "\n</answer>",
    "\n",
    "\n\n",
    " ",
    "\t",
    "\r",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x85",
    "\u00a0",
    "\u2003",
    "\u3000",
    "\u200b",
    "<",
    ">",
    "/",
    "reasoning",
    "answer",
    "x",
    "7",
]


def tag_strings(count: int, seed: int) -> list[str]:
    """Random short strings over TAG_ALPHABET, plus random edits of the perfect layout (so that the
    strict and soft layouts are hit often, and missed by one edit often)."""
    rng = random.Random(seed)
    strings = ["".join(rng.choice(TAG_ALPHABET) for _ in range(rng.randint(0, 12))) for _ in range(count)]
    layout = ["<reasoning>\n", "r", "\n</reasoning>\n<answer>\n", "7", "\n</answer>\n"]
    for _ in range(count):
        pieces = list(layout)
        for _ in range(rng.randint(0, 3)):
            where = rng.randrange(len(pieces) + 1)
            edit = rng.choice(("insert", "delete", "replace"))
            if edit == "insert" or not pieces:
                pieces.insert(where, rng.choice(TAG_ALPHABET))
            elif edit == "delete":
                pieces.pop(min(where, len(pieces) - 1))
            else:
                pieces[min(where, len(pieces) - 1)] = rng.choice(TAG_ALPHABET)
        strings.append("".join(pieces))
    return strings


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_format_rewards_equal_the_reference_patterns_on_random_tag_strings(seed):
    texts = tag_strings(2000, seed)
    soft = soft_format_reward_func(texts)
    strict = strict_format_reward_func(texts)
    expected_soft = [0.5 if REFERENCE_SOFT.match(t) else 0.0 for t in texts]
    expected_strict = [0.5 if REFERENCE_STRICT.match(t) else 0.0 for t in texts]
    for text, got, want in zip(texts, soft, expected_soft, strict=True):
        assert got == want, f"soft {text!r}"
    for text, got, want in zip(texts, strict, expected_strict, strict=True):
        assert got == want, f"strict {text!r}"
    for text in texts:
        assert count_xml(text) == pytest.approx(reference_count_xml(text), abs=1e-12), repr(text)
    # the comparison means something only if both outcomes occur often
    assert 100 < expected_soft.count(0.5) < len(texts) - 100
    assert 100 < expected_strict.count(0.5) < len(texts) - 100


def test_format_rewards_equal_the_reference_on_hand_picked_edge_cases():
    cases = [
        "<reasoning></reasoning><answer></answer>",  # empty parts
        "<reasoning></reasoning>",
        "<reasoning>a</reasoning>\u00a0\u3000<answer>b</answer>",  # Unicode whitespace is "\s"
        "<reasoning>a</reasoning>\u200b<answer>b</answer>",  # a zero-width space is not
        "<reasoning>a</reasoning>x</reasoning> <answer>b</answer>",  # a later </reasoning> may work
        "<reasoning>a</reasoning> <answer>b</answer></answer>",
        "<reasoning></answer></reasoning><answer>b",  # </answer> before <answer> does not count
        "<reasoning>\n\n</reasoning>\n<answer>\n\n</answer>\n",  # empty strict parts
        "<reasoning>\n\n</reasoning>\n<answer>\n\n</answer>\n\n",  # "$" before a final newline
        "<reasoning>\n\n</reasoning>\n<answer>\n\n</answer>\n\n\n",
        "<reasoning>\n</reasoning>\n<answer>\n</answer>\n",  # the newlines cannot be shared
        "<reasoning>\n\n</reasoning>\n<answer>\n\n</reasoning>\n<answer>\n\n</answer>\n",
        "<reasoning>\n\n</reasoning>\n<answer>\n</answer>\n",
        # overlapping "\n</answer>\n": split (the reference) and rpartition would cut at different places
        "<reasoning>\nr\n</reasoning>\n<answer>\n7\n</answer>\n</answer>\nxy",
    ]
    for text in cases:
        assert soft_format_reward_func([text]) == [0.5 if REFERENCE_SOFT.match(text) else 0.0], repr(text)
        assert strict_format_reward_func([text]) == [0.5 if REFERENCE_STRICT.match(text) else 0.0], repr(text)
        assert count_xml(text) == pytest.approx(reference_count_xml(text), abs=1e-12), repr(text)


# ---------------------------------------------------------------------------- linear time
# The issue: the reference patterns took 1.5 s on 64 KB and 340 s on 1 MB. Checked by the ratio of the
# times on n and 4n characters (linear: about 4; quadratic: about 16), never by seconds. CPU time of this
# process, best of several runs, and a few attempts, so that other work on the machine cannot fail it.
# Both sizes are above 30,000 characters, where CPython's str.find/count switches algorithm.

LINEAR_SIZE = 40_000
LINEAR_RATIO_LIMIT = 8.0


def _repeat_to(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


ADVERSARIAL_BY_SIZE = {
    "reasoning tags never closed": lambda n: _repeat_to("<reasoning>\n", n),
    "strict separators, no closing answer": lambda n: (
        "<reasoning>\n" + _repeat_to("\n</reasoning>\n<answer>\n", n)
    ),
    "soft separators, no closing answer": lambda n: "<reasoning>" + _repeat_to("</reasoning><answer>", n),
    "closed reasoning, whitespace, no answer": lambda n: (
        "<reasoning>" + _repeat_to("</reasoning> \n\t \n", n)
    ),
    "newlines": lambda n: "\n" * n,
    "answer of thousands separators": lambda n: "<answer>" + _repeat_to("1,000", n) + "x",
    "answer of decimals": lambda n: "<answer>" + _repeat_to("1.1", n) + "x",
    "answer of trailing punctuation": lambda n: "<answer>yes" + _repeat_to(" .", n),
    "answer of labels and letters": lambda n: "<answer>" + _repeat_to("B yes (C) \u22125 ", n),
}
ANSWER_COLUMNS = {"gsm8k": "18", "pubmedqa": "yes", "med_mc": "B"}


def _cpu_time(func, texts: list[str], db_set: str) -> float:
    columns = {"answer": [ANSWER_COLUMNS[db_set]] * len(texts), "db_set": [db_set] * len(texts)}
    best = math.inf
    for _ in range(5):
        start = time.process_time()
        func(texts, **columns)
        best = min(best, time.process_time() - start)
    return best


def _growth_ratio(func, make, db_set: str) -> float:
    """CPU time on 4n characters / CPU time on n (2 completions each), the smallest of 3 attempts."""
    ratios = []
    for _ in range(3):
        small = _cpu_time(func, [make(LINEAR_SIZE)] * 2, db_set)
        large = _cpu_time(func, [make(4 * LINEAR_SIZE)] * 2, db_set)
        ratios.append(large / max(small, 1e-6))
        if ratios[-1] < LINEAR_RATIO_LIMIT:
            break
    return min(ratios)


@pytest.mark.parametrize("case", list(ADVERSARIAL_BY_SIZE))
def test_every_reward_takes_time_linear_in_the_completion_length(case):
    make = ADVERSARIAL_BY_SIZE[case]
    assert len(make(LINEAR_SIZE)) >= LINEAR_SIZE
    for name, func in REWARD_FUNCS.items():
        for db_set in ANSWER_COLUMNS if name in ("int_reward_func", "correctness_reward_func") else ["gsm8k"]:
            ratio = _growth_ratio(func, make, db_set)
            assert ratio < LINEAR_RATIO_LIMIT, f"{name} on {case!r} ({db_set}): 4x longer took {ratio:.1f}x"


def test_the_linear_time_check_catches_the_quadratic_reference():
    # The check above must be able to fail: the reference pattern grows about 16x for 4x the length.
    # (Smaller sizes than above, to keep this fast; the quadratic part dominates already.)
    def reference_soft(completions, **columns):
        return [0.5 if REFERENCE_SOFT.match(c) else 0.0 for c in completions]

    make = ADVERSARIAL_BY_SIZE["strict separators, no closing answer"]
    small = _cpu_time(reference_soft, [make(4_000)], "gsm8k")
    large = _cpu_time(reference_soft, [make(16_000)], "gsm8k")
    assert large / small > LINEAR_RATIO_LIMIT


# ---------------------------------------------------------------------------- answer normalisation
# docs/REWARDS.md, "Answer normalisation": each rule with the examples below. Expected values by hand:
# (answer written, gold, db_set, correctness, int_reward).

NORMALISATION_CASES = [
    # trailing punctuation (. ! ? , ; : and whitespace) is ignored by correctness, in every source ...
    ("18.", "18", "gsm8k", 2.0, 0.0),
    ("18!", "18", "gsm8k", 2.0, 0.0),
    ("18 ...", "18", "gsm8k", 2.0, 0.0),
    ("$1,080.", "1080", "gsm8k", 2.0, 0.0),
    ("2.50.", "2.5", "gsm8k", 2.0, 0.0),
    ("18.5", "18", "gsm8k", 0.0, 0.0),  # a decimal point is not punctuation
    ("Yes.", "yes", "pubmedqa", 2.0, 0.0),
    ("no!", "no", "pubmedqa", 2.0, 0.0),
    ("maybe?", "maybe", "pubmedqa", 2.0, 0.0),
    ("Yes;", "yes", "pubmedqa", 2.0, 0.0),
    ("Yes.", "no", "pubmedqa", 0.0, 0.0),
    ("B.", "B", "med_mc", 2.0, 0.0),
    ("B:", "B", "med_mc", 2.0, 0.0),
    ("b!", "B", "med_mc", 2.0, 0.0),
    # ... while int_reward keeps asking for the bare form (surrounding whitespace aside)
    (" 18 ", "18", "gsm8k", 2.0, 0.5),
    (" yes ", "yes", "pubmedqa", 2.0, 0.5),
    (" b ", "B", "med_mc", 2.0, 0.5),
    # option letters: any case, with brackets, are the letter
    ("a", "A", "med_mc", 2.0, 0.5),
    ("a)", "A", "med_mc", 2.0, 0.0),
    ("A)", "A", "med_mc", 2.0, 0.0),
    ("(B)", "B", "med_mc", 2.0, 0.0),
    ("(b)", "B", "med_mc", 2.0, 0.0),
    ("[C]", "C", "med_mc", 2.0, 0.0),
    ("(B).", "B", "med_mc", 2.0, 0.0),
    ("(B)", "C", "med_mc", 0.0, 0.0),
    ("B", "(B)", "med_mc", 2.0, 0.5),  # the gold is normalised the same way
    ("b) Insulin", "B", "med_mc", 1.0, 0.0),  # a leading label in any case: partial
    ("[B] Insulin", "B", "med_mc", 1.0, 0.0),
    ("c) Vitamin B", "B", "med_mc", 0.0, 0.0),  # the label decides
    ("The answer is b", "B", "med_mc", 0.0, 0.0),  # a lowercase letter in free text is not an option
    ("E)", "B", "med_mc", 0.0, 0.0),
    # a Unicode minus (or dash) directly before a digit is a minus
    ("\u22125", "-5", "gsm8k", 2.0, 0.5),
    ("\u20135", "-5", "gsm8k", 2.0, 0.5),  # en dash
    ("\u22121,080.", "-1080", "gsm8k", 2.0, 0.0),
    ("-7", "\u22127", "gsm8k", 2.0, 0.5),  # in the gold too
    ("\u22125", "5", "gsm8k", 0.0, 0.5),  # -5 is not 5 (it used to get the partial credit)
    ("\u22125 degrees", "-5", "gsm8k", 1.0, 0.0),
    ("18\u201320", "18", "gsm8k", 0.0, 0.0),  # a range: two numbers
    ("\u2212 5", "-5", "gsm8k", 0.0, 0.0),  # not directly before the digit: a dash, and 5 is not -5
]


@pytest.mark.parametrize(("written", "gold", "db_set", "expected", "expected_type"), NORMALISATION_CASES)
def test_answer_normalisation_rules(written, gold, db_set, expected, expected_type):
    assert correctness(written, gold, db_set) == expected
    assert int_reward(written, db_set) == expected_type


def test_trailing_punctuation_is_uniform_across_sources():
    # The issue: "Yes." got 1.0 while "18." got 2.0. The same ending now means the same in every source.
    for ending in (".", "!", "?", ";", ":", ",", " .", "..."):
        assert correctness("18" + ending, "18", "gsm8k") == 2.0, ending
        assert correctness("yes" + ending, "yes", "pubmedqa") == 2.0, ending
        assert correctness("B" + ending, "B", "med_mc") == 2.0, ending
        assert {int_reward("18" + ending, "gsm8k"), int_reward("yes" + ending, "pubmedqa")} == {0.0}


# ---------------------------------------------------------------------------- TRL's signature


def test_combine_rewards_calls_trl_style_functions_with_prompts_and_completion_ids():
    seen = {}

    def trl_length_reward(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, kwargs=kwargs)
        return [float(len(ids)) for ids in completion_ids]

    completions = [PERFECT, "short"]
    columns = {"answer": ["7", "8"], "db_set": ["gsm8k", "gsm8k"]}
    total, per_func = combine_rewards(
        completions,
        columns,
        ["correctness_reward_func", trl_length_reward],
        prompts=["p0", "p1"],
        completion_ids=[[1, 2, 3], [4]],
        max_completion_length=64,
    )
    assert list(per_func) == ["correctness_reward_func", "trl_length_reward"]
    assert per_func["trl_length_reward"].tolist() == [3.0, 1.0]
    assert total.tolist() == [2.0 + 3.0, 0.0 + 1.0]
    assert seen["prompts"] == ["p0", "p1"] and seen["completions"] == completions
    # **kwargs gets every column and every extra keyword, and nothing of TRL's trainer extras
    assert seen["kwargs"] == {"answer": ["7", "8"], "db_set": ["gsm8k", "gsm8k"], "max_completion_length": 64}


def test_combine_rewards_passes_only_the_arguments_a_function_names():
    calls = []

    def ours_renamed(texts, answer):  # our convention, completions under another name, no **kwargs
        calls.append(("ours_renamed", texts, answer))
        return [1.0] * len(texts)

    def keyword_only(*, completions, db_set):
        calls.append(("keyword_only", completions, db_set))
        return [2.0] * len(completions)

    def only_ids(completion_ids, **kwargs):  # TRL's overlong punishment has this shape
        calls.append(("only_ids", completion_ids, sorted(kwargs)))
        return [float(len(ids)) for ids in completion_ids]

    total, per_func = combine_rewards(
        ["a"],
        {"answer": ["7"], "db_set": ["gsm8k"]},
        [ours_renamed, keyword_only, only_ids],
        prompts=["p"],
        completion_ids=[[5, 6]],
    )
    assert calls == [
        ("ours_renamed", ["a"], ["7"]),
        ("keyword_only", ["a"], ["gsm8k"]),
        ("only_ids", [[5, 6]], ["answer", "completions", "db_set", "prompts"]),
    ]
    assert total.tolist() == [1.0 + 2.0 + 2.0]


def test_combine_rewards_names_callables_as_trl_does():
    class LengthPenalty:  # a callable object with a __name__, as TRL's reward classes
        __name__ = "length_penalty_reward"

        def __call__(self, completion_ids, **kwargs):
            return [-float(len(ids)) for ids in completion_ids]

    class Unnamed:
        def __call__(self, completions, **kwargs):
            return [0.0] * len(completions)

    def scaled(completions, factor, **columns):
        return [factor * len(c) for c in completions]

    _, per_func = combine_rewards(
        ["ab"], {}, [LengthPenalty(), Unnamed(), functools.partial(scaled, factor=0.5)], completion_ids=[[1]]
    )
    assert per_func == {
        "length_penalty_reward": torch.tensor([-1.0]),
        "Unnamed": torch.tensor([0.0]),
        "scaled": torch.tensor([1.0]),
    }


def test_combine_rewards_argument_errors_are_clear():
    columns = {"answer": ["7"], "db_set": ["gsm8k"]}

    def needs_prompts(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(RewardFuncError, match=r"'needs_prompts' cannot be called .*'prompts'"):
        combine_rewards([PERFECT], columns, [needs_prompts])  # no prompts= given
    with pytest.raises(
        RewardFuncError, match="'prompts' is given both as a dataset column and as an argument"
    ):
        combine_rewards([PERFECT], {**columns, "prompts": ["x"]}, [needs_prompts], prompts=["p"])
    with pytest.raises(RewardFuncError, match="may not be named 'completions'"):
        combine_rewards([PERFECT], {**columns, "completions": ["x"]})
    with pytest.raises(RewardFuncError, match=r"named twice: \['int_reward_func'\]"):
        combine_rewards([PERFECT], columns, ["int_reward_func", int_reward_func])

    def gives_none(
        completions, **kwargs
    ):  # TRL's "does not apply": with no other function, nothing scores it
        return [None]

    def gives_nan(completions, **kwargs):  # NaN is not None: a broken reward
        return [math.nan]

    def gives_a_number(completions, **kwargs):
        return 1.0

    with pytest.raises(
        RewardFuncError,
        match=r"no reward function applies to row 0 \(gsm8k\): 'gives_none' all returned None",
    ):
        combine_rewards([PERFECT], columns, [gives_none])
    with pytest.raises(
        RewardFuncError, match=r"'gives_nan' returned nan for row 0 \(gsm8k\); a reward must be"
    ):
        combine_rewards([PERFECT], columns, [gives_nan])
    with pytest.raises(RewardFuncError, match="'gives_a_number' returned float, not a list of 1 numbers"):
        combine_rewards([PERFECT], columns, [gives_a_number])

    def gives_a_tensor(completions, **kwargs):
        return torch.tensor([0.25] * len(completions))

    _, per_func = combine_rewards(
        [PERFECT, ""], {"answer": ["7", "7"], "db_set": ["gsm8k"] * 2}, [gives_a_tensor]
    )
    assert per_func["gives_a_tensor"].tolist() == [0.25, 0.25]


# ---------------------------------------------------------------------------- reward functions by import path


USER_MODULE = """
def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def trl_style(prompts, completions, completion_ids, **kwargs):
    return [float(len(p)) for p in prompts]


class Holder:
    @staticmethod
    def constant(completions, **kwargs):
        return [3.0] * len(completions)


NOT_CALLABLE = 3
"""


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A package ``grpo_test_user_rewards`` on sys.path: ``scoring`` (reward functions) and ``broken``
    (fails to import: it imports a module that does not exist)."""
    package = tmp_path / "grpo_test_user_rewards"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text(USER_MODULE)
    (package / "broken.py").write_text("import grpo_test_no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "grpo_test_user_rewards"


def test_resolve_reward_func_by_import_path(user_package):
    import grpo_test_user_rewards.scoring as scoring

    assert resolve_reward_func(f"{user_package}.scoring:length_reward") is scoring.length_reward
    assert resolve_reward_func(f"{user_package}.scoring.length_reward") is scoring.length_reward  # TRL's form
    assert resolve_reward_func(f"{user_package}.scoring:Holder.constant") is scoring.Holder.constant
    # built-in names still resolve to the built-ins; callables are returned as they are
    for name, func in REWARD_FUNCS.items():
        assert resolve_reward_func(name) is func
    assert resolve_reward_func("soft_overlong_punishment") is soft_overlong_punishment_reward_func
    assert resolve_reward_func(scoring.length_reward) is scoring.length_reward


def test_combine_rewards_accepts_import_paths(user_package):
    spec = f"{user_package}.scoring:length_reward"
    trl_spec = f"{user_package}.scoring:trl_style"
    total, per_func = combine_rewards(
        ["abc", "<answer>7</answer>"],
        {"answer": ["7", "7"], "db_set": ["gsm8k", "gsm8k"]},
        ["correctness_reward_func", spec, trl_spec],
        weights=[1.0, 0.5, 1.0],
        prompts=["p", "pp"],
        completion_ids=[[1], [2]],
    )
    assert list(per_func) == ["correctness_reward_func", spec, trl_spec]  # named as the config wrote them
    assert per_func[spec].tolist() == [3.0, 18.0]
    assert per_func[trl_spec].tolist() == [1.0, 2.0]
    assert total.tolist() == [0.0 + 1.5 + 1.0, 2.0 + 9.0 + 2.0]


def test_resolve_reward_func_errors_name_the_spec(user_package):
    cases = [
        ("grpo_test_missing_pkg.rewards:fn", "cannot find module 'grpo_test_missing_pkg.rewards'"),
        (f"{user_package}.nope:fn", f"cannot find module '{user_package}.nope'"),
        (f"{user_package}.scoring:missing", "has no attribute 'missing'"),
        (f"{user_package}.scoring:Holder.missing", "has no attribute 'Holder.missing'"),
        (f"{user_package}.scoring:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a callable"),
        (
            f"{user_package}.broken:fn",
            "importing module 'grpo_test_user_rewards.broken' failed: ModuleNotFound",
        ),
        ("nope", "unknown reward function 'nope'; known: xmlcount_reward_func"),
        (":fn", "unknown reward function ':fn'"),
        ("module:", "unknown reward function 'module:'"),
    ]
    for spec, message in cases:
        with pytest.raises(RewardFuncError, match=re.escape(message)) as raised:
            resolve_reward_func(spec)
        assert repr(spec) in str(raised.value), spec
    with pytest.raises(RewardFuncError, match="must be a name, an import path or a callable, got 3"):
        resolve_reward_func(3)
    with pytest.raises(RewardFuncError, match="grpo_test_missing_pkg"):
        combine_rewards([PERFECT], {}, ["grpo_test_missing_pkg:fn"])


# ---------------------------------------------------------------------------- DAPO's soft overlong punishment


def trl_soft_overlong_punishment(max_completion_len, soft_punish_cache, completion_ids):
    """TRL 1.16's _SoftOverlongPunishment.__call__, copied as the reference."""
    rewards = []
    for ids in completion_ids:
        completion_length = len(ids)
        if completion_length <= max_completion_len - soft_punish_cache:
            rewards.append(0.0)
        elif max_completion_len - soft_punish_cache < completion_length <= max_completion_len:
            rewards.append((max_completion_len - soft_punish_cache - completion_length) / soft_punish_cache)
        else:
            rewards.append(-1.0)
    return rewards


def test_overlong_penalty_at_the_boundaries():
    # L = 100, C = 20: no penalty up to 80 tokens, then -1/20 per token, -1 at and beyond 100.
    expected = {0: 0.0, 79: 0.0, 80: 0.0, 81: -0.05, 90: -0.5, 99: -0.95, 100: -1.0, 101: -1.0, 500: -1.0}
    for length, value in expected.items():
        assert overlong_penalty(length, 100, 20) == pytest.approx(value), length
    # C = 0: a hard limit, 0 up to L, -1 beyond
    assert [overlong_penalty(n, 10, 0) for n in (0, 10, 11)] == [0.0, 0.0, -1.0]
    # C = L: the penalty starts at the first token
    assert [overlong_penalty(n, 4, 4) for n in (0, 1, 2, 4, 5)] == [0.0, -0.25, -0.5, -1.0, -1.0]


def test_soft_overlong_punishment_equals_trl():
    ids = [[7] * n for n in range(0, 140)]
    for max_length, cache in ((100, 20), (128, 0), (16, 16), (50, 1), (1, 1)):
        expected = trl_soft_overlong_punishment(max_length, cache, ids)
        assert soft_overlong_punishment(max_length, cache)(completion_ids=ids) == expected
        texts = ["x"] * len(ids)
        assert soft_overlong_punishment_reward_func(texts, ids, max_length, cache) == expected


def test_soft_overlong_punishment_through_combine_rewards():
    completion_ids = [[1] * 80, [1] * 90, [1] * 100]
    texts = ["a", "b", "c"]
    # the registered name: limits passed by the trainer as extra keywords
    total, per_func = combine_rewards(
        texts,
        {"answer": ["7"] * 3, "db_set": ["gsm8k"] * 3},
        ["soft_overlong_punishment"],
        completion_ids=completion_ids,
        max_completion_length=100,
        soft_punish_cache=20,
    )
    assert per_func["soft_overlong_punishment"].tolist() == [0.0, -0.5, -1.0]
    # the factory: limits fixed once, TRL's form
    _, per_func = combine_rewards(
        texts, {}, [soft_overlong_punishment(100, 40)], completion_ids=completion_ids
    )
    assert per_func["soft_overlong_punishment"].tolist() == pytest.approx([-0.5, -0.75, -1.0])
    # not part of the recipe: the default five do not include it
    assert (
        "soft_overlong_punishment" in OPTIONAL_REWARD_FUNCS and "soft_overlong_punishment" not in REWARD_FUNCS
    )


def test_soft_overlong_punishment_errors():
    with pytest.raises(ValueError, match="needs completion_ids"):
        combine_rewards(
            ["a"], {}, ["soft_overlong_punishment"], max_completion_length=10, soft_punish_cache=2
        )
    with pytest.raises(ValueError, match="needs max_completion_length"):
        combine_rewards(["a"], {}, ["soft_overlong_punishment"], completion_ids=[[1]], soft_punish_cache=2)
    with pytest.raises(ValueError, match="needs soft_punish_cache"):
        soft_overlong_punishment_reward_func(["a"], [[1]], max_completion_length=10)
    with pytest.raises(ValueError, match="not a tensor"):
        soft_overlong_punishment_reward_func(["a"], torch.ones(1, 4), 10, 2)
    with pytest.raises(ValueError, match="2 completions but 1 completion_ids entries"):
        soft_overlong_punishment_reward_func(["a", "b"], [[1]], 10, 2)
    with pytest.raises(
        ValueError, match=r"soft_punish_cache must be in \[0, max_completion_length=10\], got 11"
    ):
        soft_overlong_punishment(10, 11)
    with pytest.raises(ValueError, match="max_completion_length must be positive, got 0"):
        soft_overlong_punishment(0, 0)
    with pytest.raises(ValueError, match="soft_punish_cache must be an integer, got 2.5"):
        soft_overlong_punishment(10, 2.5)


# ---------------------------------------------------------------------------- None: "does not apply"

NAN = float("nan")
COLUMNS3 = {"answer": ["7", "yes", "B"], "db_set": ["gsm8k", "pubmedqa", "med_mc"]}
TEXTS3 = [PERFECT, "<answer>\nyes\n</answer>", "<answer>\nC\n</answer>"]


def medical_only(completions, db_set, **kwargs):
    """1.0 for a medical source, None ("does not apply") for gsm8k."""
    return [None if source == "gsm8k" else 1.0 for source in db_set]


def test_none_is_left_out_of_the_weighted_sum():
    total, per_func = combine_rewards(
        TEXTS3, COLUMNS3, ["correctness_reward_func", medical_only], weights=[1.0, 0.5]
    )
    # correctness: [2, 2, 0]; medical_only: [None, 1, 1] -> NaN in per_func, left out of the total
    assert per_func["correctness_reward_func"].tolist() == [2.0, 2.0, 0.0]
    assert math.isnan(per_func["medical_only"][0].item())
    assert per_func["medical_only"][1:].tolist() == [1.0, 1.0]
    assert total.tolist() == [2.0, 2.0 + 0.5, 0.0 + 0.5]


def test_a_completion_no_function_applies_to_is_one_clear_error():
    def math_only(completions, db_set, **kwargs):
        return [1.0 if source == "gsm8k" else None for source in db_set]

    def nothing_for_med_mc(completions, db_set, **kwargs):
        return [None if source == "med_mc" else 0.0 for source in db_set]

    # row 0 (gsm8k): both apply; row 1 (pubmedqa): the second; row 2 (med_mc): neither
    with pytest.raises(
        RewardFuncError,
        match=r"^no reward function applies to row 2 \(med_mc\): 'math_only', 'nothing_for_med_mc' all "
        r"returned None for it; every completion needs a reward from at least one function$",
    ) as raised:
        combine_rewards(TEXTS3, COLUMNS3, [math_only, nothing_for_med_mc])
    assert raised.value.row == 2
    # the caller's names for the rows (the trainer's: the prompt's place in the training stream)
    names = [
        "prompt 12 (gsm8k), completion 0",
        "prompt 12 (gsm8k), completion 1",
        "prompt 13 (med_mc), completion 0",
    ]
    with pytest.raises(RewardFuncError, match=r"applies to prompt 12 \(gsm8k\), completion 0:"):
        combine_rewards(TEXTS3, COLUMNS3, [medical_only], row_names=names)


def test_reward_metrics_are_over_the_completions_a_function_applies_to():
    from grpo.metrics import reward_metrics

    per_func = {
        "correctness_reward_func": torch.tensor([2.0, 0.0, 2.0, 1.0]),
        "medical_only": torch.tensor([NAN, NAN, 1.0, 0.0]),
        "never": torch.tensor([NAN, NAN, NAN, NAN]),
    }
    totals = torch.tensor([2.0, 0.0, 3.0, 1.0])  # weights 1: the sums over what applies
    out = reward_metrics(totals, per_func, ["gsm8k", "gsm8k", "pubmedqa", "pubmedqa"], 2)
    assert out["rewards/medical_only/mean"] == 0.5  # over its two completions, not 1 / 4
    assert out["rewards/medical_only/std"] == pytest.approx(math.sqrt(0.5))
    assert "rewards/never/mean" not in out and "rewards/never/std" not in out  # applied to nothing here
    assert out["rewards/correctness_reward_func/mean"] == 1.25
    assert out["accuracy/gsm8k"] == 0.5 and out["accuracy/pubmedqa"] == 0.5
    assert out["reward"] == 1.5 and out["reward/pubmedqa"] == 2.0
    # a correctness that applies to some rows only: accuracy over those
    per_func["correctness_reward_func"] = torch.tensor([2.0, NAN, NAN, NAN])
    out = reward_metrics(totals, per_func, ["gsm8k", "gsm8k", "pubmedqa", "pubmedqa"], 2)
    assert out["accuracy/gsm8k"] == 1.0 and "accuracy/pubmedqa" not in out


# ---------------------------------------------------------------------------- concurrent functions, same results

COLUMNS2 = {"answer": ["7", "7"], "db_set": ["gsm8k", "gsm8k"]}


def make_functions(log):
    """Two functions of each kind, each returning its own numbers; the earlier in the list sleeps longer,
    so that run together they finish in the reverse order."""

    def plain(k):
        def f(completions, **kwargs):
            time.sleep(0.002 * (6 - k))
            log.append(k)
            return [10.0 * k + i for i in range(len(completions))]

        f.__name__ = f"plain_{k}"
        return f

    def thread_safe(k):
        f = plain(k)
        f.__name__, f.thread_safe = f"thread_safe_{k}", True
        return f

    def async_(k):
        async def f(completions, **kwargs):
            await asyncio.sleep(0.002 * (6 - k))
            log.append(k)
            return [10.0 * k + i for i in range(len(completions))]

        f.__name__ = f"async_{k}"
        return f

    return [async_(0), thread_safe(1), plain(2), async_(3), thread_safe(4), plain(5)]


def sequential_reference(funcs, completions, columns):
    """Each function called alone, one after another: the results the concurrent run must give."""
    out = {}
    for f in funcs:
        values = f(completions, **columns)
        out[f.__name__] = asyncio.run(values) if asyncio.iscoroutine(values) else values
    return out


@pytest.mark.parametrize("num_workers", [0, 1, 2, 4])
def test_concurrent_functions_give_the_sequential_results_in_order(num_workers):
    log: list[int] = []
    funcs = make_functions(log)
    expected = sequential_reference(funcs, [PERFECT, ""], COLUMNS2)
    log.clear()
    total, per_func = combine_rewards([PERFECT, ""], COLUMNS2, funcs, num_workers=num_workers)
    assert list(per_func) == [f.__name__ for f in funcs]
    assert {name: values.tolist() for name, values in per_func.items()} == expected
    assert total.tolist() == [sum(10.0 * k for k in range(6)), sum(10.0 * k + 1 for k in range(6))]
    assert sorted(log) == list(range(6))


def test_async_functions_are_awaited_together():
    """Each function waits for the other to have started: run one after another, the first would wait
    forever (here: until its 30 s bound, then fail)."""
    started: dict[str, asyncio.Event] = {}

    def rendezvous(me, other):
        async def f(completions, **kwargs):
            started.setdefault(me, asyncio.Event()).set()
            await asyncio.wait_for(started.setdefault(other, asyncio.Event()).wait(), 30)
            return [1.0] * len(completions)

        f.__name__ = me
        return f

    _, per_func = combine_rewards(
        [PERFECT],
        COLUMNS2 | {"answer": ["7"], "db_set": ["gsm8k"]},
        [rendezvous("a", "b"), rendezvous("b", "a")],
    )
    assert per_func["a"].tolist() == per_func["b"].tolist() == [1.0]


def test_thread_safe_functions_run_together_and_plain_ones_one_at_a_time():
    barrier = threading.Barrier(2, timeout=30)  # both thread-safe functions must be inside at once
    lock, running, most = threading.Lock(), [0], [0]

    def enter_exit(wait):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        wait()
        with lock:
            running[0] -= 1

    def meets(name):
        def f(completions, **kwargs):
            barrier.wait()
            return [1.0] * len(completions)

        f.__name__, f.thread_safe = name, True
        return f

    def plain(name):
        def f(completions, **kwargs):
            enter_exit(lambda: time.sleep(0.01))
            return [2.0] * len(completions)

        f.__name__ = name
        return f

    funcs = [meets("ts_a"), plain("p_a"), meets("ts_b"), plain("p_b"), plain("p_c")]
    _, per_func = combine_rewards([PERFECT], {"answer": ["7"], "db_set": ["gsm8k"]}, funcs, num_workers=2)
    assert [v.item() for v in per_func.values()] == [1.0, 2.0, 1.0, 2.0, 2.0]
    assert most[0] == 1  # the plain functions never overlapped each other
    # with one worker the two thread-safe functions cannot meet: the first one's barrier breaks
    barrier = threading.Barrier(2, timeout=0.2)
    with pytest.raises(RewardFuncError, match="'ts_a' raised BrokenBarrierError"):
        combine_rewards([PERFECT], {"answer": ["7"], "db_set": ["gsm8k"]}, funcs, num_workers=1)


def test_async_and_thread_safe_callables_are_recognised():
    class Judge:
        async def __call__(self, completions, **kwargs):
            return [0.5] * len(completions)

    def sandbox(completions, scale, **kwargs):
        return [scale] * len(completions)

    sandbox.thread_safe = True
    assert rewards.running.call_kind(Judge()) == "async"
    assert rewards.running.call_kind(functools.partial(Judge())) == "async"
    assert rewards.running.call_kind(functools.partial(sandbox, scale=3.0)) == "thread_safe"
    assert rewards.running.call_kind(correctness_reward_func) == "plain"
    _, per_func = combine_rewards([PERFECT], {"answer": ["7"], "db_set": ["gsm8k"]}, [Judge()])
    assert per_func["Judge"].tolist() == [0.5]


# ---------------------------------------------------------------------------- a reward that fails

ONE = {"answer": ["7"], "db_set": ["gsm8k"]}


def test_a_function_that_raises_is_named_with_the_completion_it_fails_on():
    calls = []

    def picky(completions, answer, **kwargs):
        calls.append(len(completions))
        if "yes" in answer:
            raise ValueError("cannot score a yes/no answer")
        return [1.0] * len(completions)

    with pytest.raises(
        RewardFuncError,
        match=r"^reward function 'picky' raised ValueError: cannot score a yes/no answer on row 1 \(pubmedqa\)$",
    ) as raised:
        combine_rewards(TEXTS3, COLUMNS3, ["int_reward_func", picky])
    assert isinstance(raised.value.__cause__, ValueError)  # --debug shows the function's own traceback
    assert raised.value.row == 1
    assert calls == [3, 1, 1]  # the batch, then one completion at a time until one fails

    def batch_only(completions, **kwargs):
        if len(completions) > 1:
            raise RuntimeError("needs one completion at a time")
        return [0.0]

    with pytest.raises(
        RewardFuncError,
        match=r"'batch_only' raised RuntimeError: needs one completion at a time on a batch of 3 completions "
        r"\(row 0 \(gsm8k\) \.\.\. row 2 \(med_mc\)\)$",
    ):
        combine_rewards(TEXTS3, COLUMNS3, [batch_only])

    async def names_its_row(completions, **kwargs):  # a RewardFuncError of its own: no search, its row named
        raise RewardFuncError("the judge refused it", row=2)

    with pytest.raises(
        RewardFuncError, match=r"'names_its_row' raised RewardFuncError: the judge refused it on row 2"
    ):
        combine_rewards(TEXTS3, COLUMNS3, [names_its_row])


@pytest.mark.parametrize("kind", ["plain", "thread_safe", "async"])
def test_a_function_that_overruns_the_timeout_is_named(kind):
    release = threading.Event()

    if kind == "async":

        async def stuck(completions, **kwargs):
            await asyncio.Event().wait()  # never set: cancelled at the deadline

    else:

        def stuck(completions, **kwargs):
            release.wait(60)  # abandoned at the deadline; released at the end of the test
            return [0.0] * len(completions)

        stuck.thread_safe = kind == "thread_safe"
    try:
        with pytest.raises(
            RewardFuncError,
            match=r"^reward function 'stuck' did not return within reward_timeout=0.2 s on a batch of 3 "
            r"completions \(row 0 \(gsm8k\) \.\.\. row 2 \(med_mc\)\)$",
        ):
            combine_rewards(TEXTS3, COLUMNS3, ["int_reward_func", stuck], timeout=0.2)
    finally:
        release.set()
    # within the limit nothing changes
    _, per_func = combine_rewards(TEXTS3, COLUMNS3, make_functions([])[:3], timeout=30)
    assert per_func["async_0"].tolist() == [0.0, 1.0, 2.0]


def test_non_finite_and_wrongly_sized_results_are_named():
    def gives_inf(completions, **kwargs):
        return [0.0, math.inf, 0.0]

    with pytest.raises(
        RewardFuncError, match=r"'gives_inf' returned inf for row 1 \(pubmedqa\); a reward must"
    ):
        combine_rewards(TEXTS3, COLUMNS3, [gives_inf])

    def gives_text(completions, **kwargs):
        return [0.0, "high", 0.0]

    with pytest.raises(RewardFuncError, match=r"'gives_text' returned 'high' for row 1 \(pubmedqa\)"):
        combine_rewards(TEXTS3, COLUMNS3, [gives_text])

    async def gives_two(completions, **kwargs):
        return [0.0, 0.0]

    with pytest.raises(RewardFuncError, match=r"'gives_two' returned 2 values for a batch of 3 completions"):
        combine_rewards(TEXTS3, COLUMNS3, [gives_two])


def test_the_failure_reported_is_the_first_in_the_functions_order():
    """The plain function fails first in time (it runs while the async one waits for it); the async one,
    first in the list, is the one reported, as in a run of one function after another."""
    plain_failed = threading.Event()

    async def first(completions, **kwargs):
        await asyncio.to_thread(plain_failed.wait, 30)
        raise KeyError("first")

    def second(completions, **kwargs):
        plain_failed.set()
        raise KeyError("second")

    with pytest.raises(RewardFuncError, match="'first' raised KeyError"):
        combine_rewards([PERFECT], ONE, [first, second])


def test_the_worked_example_of_docs_rewards():
    """docs/REWARDS.md, "A worked example": cites_guideline (None for gsm8k) beside correctness."""
    from grpo.advantages import multi_objective_advantages
    from grpo.metrics import reward_metrics

    def cites_guideline(completions, db_set, **columns):
        return [
            None if source == "gsm8k" else 0.5 * ("guideline" in text.lower())
            for text, source in zip(completions, db_set, strict=True)
        ]

    texts = [
        "<answer>\nyes\n</answer> per the ESC guideline",
        "<answer>\nno\n</answer>",
        "<answer>\n7\n</answer>",
        "<answer>\n8\n</answer>",
    ]
    columns = {"answer": ["yes", "yes", "7", "7"], "db_set": ["pubmedqa", "pubmedqa", "gsm8k", "gsm8k"]}
    total, per_func = combine_rewards(texts, columns, ["correctness_reward_func", cites_guideline])
    assert total.tolist() == [2.5, 0.0, 2.0, 0.0]
    metrics = reward_metrics(total, per_func, columns["db_set"], 2)
    assert metrics["rewards/cites_guideline/mean"] == 0.25 and metrics["reward"] == 1.125
    table = torch.stack(list(per_func.values()), dim=1).double()
    weights = torch.ones(2, dtype=torch.float64)
    x = 1 / (math.sqrt(2) + 1e-4)
    summed = multi_objective_advantages(table, weights, 2, "sum_then_normalize")
    first = 1.25 / (math.sqrt(2 * 1.25**2) + 1e-4)  # totals [2.5, 0]: mean 1.25, std 1.7678
    torch.testing.assert_close(summed, torch.tensor([first, -first, x, -x], dtype=torch.float64))
    assert round(first, 4) == round(x, 4) == 0.7071
    gdpo = multi_objective_advantages(table, weights, 2, "normalize_then_sum")
    z_guideline = 0.25 / (math.sqrt(2 * 0.25**2) + 1e-4)
    assert z_guideline == pytest.approx(0.7069, abs=1e-4)
    s = torch.tensor([x + z_guideline, -(x + z_guideline), x, -x], dtype=torch.float64)
    std = math.sqrt((s**2).sum().item() / 3)
    assert std == pytest.approx(1.2908, abs=1e-4)
    torch.testing.assert_close(gdpo, s / (std + 1e-4))
    assert [round(a, 4) for a in gdpo.tolist()] == [1.0953, -1.0953, 0.5477, -0.5477]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("reward_num_workers", "-1", "reward_num_workers=-1: must be >= 0"),
        ("reward_timeout", "0", "reward_timeout=0.0: must be > 0 (or null = no limit)"),
        ("judge_timeout", "0", "judge_timeout=0.0: must be > 0"),
        ("judge_max_concurrency", "0", "judge_max_concurrency=0: must be > 0"),
    ],
)
def test_the_reward_settings_are_validated(field, value, message):
    from grpo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        load_config(["--model_name_or_path", "tiny-random-qwen2", f"--{field}", value])
