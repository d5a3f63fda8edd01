"""The five reward functions, answer extraction and combine_rewards (rewards/)."""

from __future__ import annotations

import doctest
import math
import random

import pytest
import torch

import rewards.answer
import rewards.format
import rewards.parsing
from grpo.config import REWARD_FUNC_NAMES
from rewards import (
    REWARD_FUNCS,
    combine_rewards,
    correctness_reward_func,
    extract_answer,
    int_reward_func,
    soft_format_reward_func,
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
    for module in (rewards.parsing, rewards.answer, rewards.format):
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
    assert correctness("Yes.", "yes", "pubmedqa") == 1.0
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

    with pytest.raises(ValueError, match="'broken' returned 1 values for 2 completions"):
        combine_rewards([PERFECT, PERFECT], {"answer": ["7", "7"], "db_set": ["gsm8k"] * 2}, funcs=[broken])
