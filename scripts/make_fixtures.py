"""Write the small synthetic data sets of data/fixtures/ (deterministic: same files on every run).

    python scripts/make_fixtures.py [--out data/fixtures] [--seed 0]

Every row is made up here, in the exact schema of its hub source, so the real loaders read them
unchanged; none is a copy of a real row. They are what the tests and the tiny CPU run train on, so
the questions are short and their answers follow simple cues a small model can pick up:

- gsm8k_{train,test}.jsonl (openai/gsm8k "main"): one- or two-step arithmetic with small numbers, the
  worked solution in GSM8K style (``<<3+4=7>>``) ending in ``#### <answer>``; a few negative answers
  and a few thousands written with separators (``#### 2,125``), as in the real data.
- pubmedqa_train.jsonl (qiaojin/PubMedQA "pqa_artificial"): a two-sentence "abstract" whose result
  sentence decides yes or no. pubids start at 90,000,000, above every real PubMed id.
- pubmedqa_test.jsonl (qiaojin/PubMedQA "pqa_labeled"): the same kind of rows with yes/no/maybe and the
  extra pqa_labeled fields; 45 rows carry pubids of the official test list (data/pubmedqa_test_pubids.json,
  ids only, the text is ours) and 15 do not, so the loader's test filter has something to drop.
- health_benchmarks_<Specialty>.jsonl (yesilhealth/Health_Benchmarks, one file per specialty): a question
  with four options "A) ..." to "D) ..." written inside ``Questions``; ``Answers`` mostly a letter, some
  "B) text" or "Answer: B" (the hub's exact answer format is unconfirmed; the loader parses all three).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["Tom", "Ana", "Li", "Sam", "Mia", "Omar", "Eva", "Raj", "Zoe", "Ben", "Ida", "Max"]
ITEMS = ["apples", "pens", "books", "eggs", "cards", "shells", "stamps", "cookies", "coins", "toys"]


# ---------------------------------------------------------------------------- GSM8K


def _gsm8k_row(rng: random.Random, kind: str | None = None) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = (
        kind
        or rng.choices(["add", "sub", "mul", "div", "two", "neg", "big"], weights=[5, 5, 4, 3, 3, 1, 1])[0]
    )
    a, b = rng.randint(2, 20), rng.randint(2, 12)
    if kind == "add":
        r = a + b
        q = f"{name} has {a} {item}. {name} buys {b} more. How many {item} does {name} have now?"
        s = f"{name} has {a} + {b} = <<{a}+{b}={r}>>{r} {item} now."
    elif kind == "sub":
        a, r = a + b, a
        q = f"{name} had {a} {item} and gave {b} away. How many {item} are left?"
        s = f"{name} has {a} - {b} = <<{a}-{b}={r}>>{r} {item} left."
    elif kind == "mul":
        a = rng.randint(2, 9)
        r = a * b
        q = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} does {name} buy?"
        s = f"{name} buys {a} * {b} = <<{a}*{b}={r}>>{r} {item}."
    elif kind == "div":
        r = rng.randint(2, 9)
        total = r * b
        q = f"{name} shares {total} {item} equally among {b} friends. How many {item} does each friend get?"
        s = f"Each friend gets {total} / {b} = <<{total}/{b}={r}>>{r} {item}."
    elif kind == "two":
        c = rng.randint(1, a + b - 1)
        mid, r = a + b, a + b - c
        q = f"{name} has {a} {item}, buys {b} more, then loses {c}. How many {item} does {name} have?"
        s = f"After buying, {name} has {a} + {b} = <<{a}+{b}={mid}>>{mid} {item}.\n{mid} - {c} = <<{mid}-{c}={r}>>{r}."
    elif kind == "neg":
        a, b = rng.randint(1, 6), rng.randint(7, 15)
        r = a - b
        q = f"It was {a} degrees at noon. By night it fell {b} degrees. What was the temperature at night?"
        s = f"The temperature at night was {a} - {b} = <<{a}-{b}={r}>>{r} degrees."
    else:  # "big"/"big,": thousands, with a separator half of the time (as in the real data) / always
        a, b = rng.randint(105, 480), rng.randint(5, 30)
        r = a * b
        q = f"A farm packs {a} {item} a day. How many {item} does it pack in {b} days?"
        s = f"It packs {a} * {b} = <<{a}*{b}={r}>>{r} {item}."
        separator = kind == "big," or (kind == "big" and rng.random() < 0.5)
        return {"question": q, "answer": f"{s}\n#### {r:,}" if separator else f"{s}\n#### {r}"}
    return {"question": q, "answer": f"{s}\n#### {r}"}


def make_gsm8k(rng: random.Random, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    # The test set always holds a few thousands with separators ("big,") and negative answers.
    kinds = [None] * (n_train + n_test - 5) + ["big,", "big,", "big,", "neg", "neg"]
    rows, seen = [], set()
    for kind in kinds:
        row = _gsm8k_row(rng, kind)
        while row["question"] in seen:  # train and test never share a question
            row = _gsm8k_row(rng, kind)
        seen.add(row["question"])
        rows.append(row)
    return rows[:n_train], rows[n_train:]


# ---------------------------------------------------------------------------- PubMedQA

DRUGS = ["zinc", "vitamin D", "aspirin", "yoga", "fish oil", "melatonin", "walking", "green tea", "iron"]
OUTCOMES = ["fatigue", "pain", "blood pressure", "cough", "anxiety", "fever", "swelling", "insomnia"]
GROUPS = ["adults", "children", "nurses", "runners", "smokers", "older women", "students"]
RESULTS = {
    "yes": ["{o} fell clearly with {d}.", "{o} was lower after {d} than after placebo.", "{d} reduced {o}."],
    "no": [
        "{o} did not change with {d}.",
        "{o} was the same after {d} and placebo.",
        "{d} had no effect on {o}.",
    ],
    "maybe": ["The effect of {d} on {o} was unclear.", "Results for {o} with {d} were mixed."],
}
LONG = {
    "yes": "{d} reduces {o} in {g}.",
    "no": "{d} does not reduce {o} in {g}.",
    "maybe": "It is not clear whether {d} reduces {o} in {g}.",
}


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pubmedqa_row(rng: random.Random, pubid: int, decision: str, labeled: bool) -> dict:
    d, o, g = rng.choice(DRUGS), rng.choice(OUTCOMES), rng.choice(GROUPS)
    weeks = rng.randint(2, 12)
    contexts = [
        f"{_capitalise(g)} took {d} or placebo for {weeks} weeks.",
        _capitalise(rng.choice(RESULTS[decision]).format(d=d, o=o)),
    ]
    context = {
        "contexts": contexts,
        "labels": ["METHODS", "RESULTS"],
        "meshes": ["Humans", d.title(), o.title()],
    }
    if labeled:
        pred = rng.choice(["yes", "no", "maybe"]) if rng.random() < 0.2 else decision
        context["reasoning_required_pred"] = list(decision)  # stored as lists of characters on the hub
        context["reasoning_free_pred"] = list(pred)
    return {
        "pubid": pubid,
        "question": f"Does {d} reduce {o} in {g}?",
        "context": context,
        "long_answer": _capitalise(LONG[decision].format(d=d, o=o, g=g)),
        "final_decision": decision,
    }


def make_pubmedqa(rng: random.Random, n_train: int, n_test_official: int, n_test_other: int):
    train = [
        _pubmedqa_row(rng, 90_000_000 + i, "yes" if rng.random() < 0.6 else "no", labeled=False)
        for i in range(n_train)
    ]
    official = sorted(json.loads((ROOT / "data" / "pubmedqa_test_pubids.json").read_text()))
    test_ids = rng.sample(official, n_test_official) + [90_500_000 + i for i in range(n_test_other)]
    rng.shuffle(test_ids)
    test = [
        _pubmedqa_row(rng, pid, rng.choice(["yes", "yes", "no", "no", "maybe"]), labeled=True)
        for pid in test_ids
    ]
    return train, test


# ---------------------------------------------------------------------------- Health_Benchmarks

# specialty -> list of (question, right answers, wrong answers)
MC_TOPICS = {
    "Cardiology": [
        (
            "Which of these is a chamber of the heart?",
            ["left atrium", "right atrium", "left ventricle", "right ventricle"],
            ["femur", "cornea", "tonsil", "spleen", "retina", "patella"],
        ),
        (
            "Which drug lowers blood pressure?",
            ["a beta blocker", "an ACE inhibitor", "a diuretic"],
            ["an antacid", "a laxative", "an antifungal", "a cough syrup", "an eye drop"],
        ),
        (
            "Which sign suggests a heart attack?",
            ["chest pain", "crushing chest pressure"],
            ["itchy scalp", "dry skin", "hiccups", "a blocked nose", "ear wax"],
        ),
    ],
    "Nutrition": [
        (
            "Which food is rich in vitamin C?",
            ["orange", "kiwi", "lemon", "strawberry"],
            ["butter", "white rice", "sugar", "salt", "lard"],
        ),
        (
            "Which food is a good source of protein?",
            ["lentils", "eggs", "fish", "tofu"],
            ["soda", "candy", "jam", "cola", "syrup"],
        ),
        ("Which nutrient gives the most energy per gram?", ["fat"], ["water", "fiber", "sodium", "zinc"]),
    ],
    "Pharmacy": [
        (
            "Which drug treats a bacterial infection?",
            ["amoxicillin", "penicillin", "doxycycline"],
            ["insulin", "paracetamol", "caffeine", "saline", "melatonin"],
        ),
        (
            "Which drug relieves mild pain?",
            ["paracetamol", "ibuprofen"],
            ["insulin", "heparin", "levothyroxine", "saline", "warfarin"],
        ),
        ("Which route gives a drug into a vein?", ["intravenous"], ["oral", "topical", "nasal", "rectal"]),
    ],
    "Vaccination": [
        ("Which vaccine protects against measles?", ["MMR"], ["BCG", "HPV", "rabies", "typhoid", "cholera"]),
        (
            "What does a vaccine train?",
            ["the immune system"],
            ["the liver", "the bones", "the skin", "the lungs"],
        ),
        (
            "Which disease is prevented by a vaccine?",
            ["polio", "tetanus", "measles", "mumps"],
            ["asthma", "gout", "acne", "myopia", "anemia"],
        ),
    ],
}


def _mc_row(rng: random.Random, question: str, right: list[str], wrong: list[str]) -> dict:
    answer = rng.choice(right)
    options = [answer] + rng.sample(wrong, 3)
    rng.shuffle(options)
    letter = "ABCD"[options.index(answer)]
    text = question + "\n" + "\n".join(f"{ltr}) {opt}" for ltr, opt in zip("ABCD", options, strict=True))
    style = rng.random()
    gold = letter if style < 0.7 else f"{letter}) {answer}" if style < 0.9 else f"Answer: {letter}"
    return {"Questions": text, "Answers": gold}


def make_health_benchmarks(rng: random.Random, n_per_specialty: int) -> dict[str, list[dict]]:
    out = {}
    for specialty, topics in MC_TOPICS.items():
        rows, seen, tries = [], set(), 0
        while len(rows) < n_per_specialty and tries < 100 * n_per_specialty:
            tries += 1
            row = _mc_row(rng, *rng.choice(topics))
            if row["Questions"] not in seen:
                seen.add(row["Questions"])
                rows.append(row)
        out[specialty] = rows
    return out


# ---------------------------------------------------------------------------- main


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "data" / "fixtures"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (the shipped files use 0)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)

    gsm_train, gsm_test = make_gsm8k(rng, n_train=400, n_test=60)
    pub_train, pub_test = make_pubmedqa(rng, n_train=400, n_test_official=45, n_test_other=15)
    files = {
        "gsm8k_train.jsonl": gsm_train,
        "gsm8k_test.jsonl": gsm_test,
        "pubmedqa_train.jsonl": pub_train,
        "pubmedqa_test.jsonl": pub_test,
    }
    for specialty, rows in make_health_benchmarks(rng, n_per_specialty=80).items():
        files[f"health_benchmarks_{specialty}.jsonl"] = rows
    for name, rows in files.items():
        write_jsonl(out / name, rows)
        print(f"{out / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
