"""The evaluation sets: which split of which source ``scripts/evaluate.py --sources`` scores.

The three training sources are evaluated on their held-out splits (never in the training stream,
``data/mixture.py``), the three medical benchmarks on their standard splits; none of the benchmarks is ever
trained on. Each source is a module of this package with the same ``load(split, data_files=None)``.
"""

from __future__ import annotations

from typing import Any, Optional

from data import gsm8k, health_benchmarks, medmcqa, medqa, mmlu_medical, pubmedqa
from data.common import DataError

# name -> (module, the split we evaluate on, its hub id), in the order reports list them.
SOURCES = {
    "gsm8k": (gsm8k, "test", "openai/gsm8k (main)"),
    "pubmedqa": (pubmedqa, "test", "qiaojin/PubMedQA (pqa_labeled, the 500 official test pubids)"),
    "health_benchmarks": (health_benchmarks, "test", "yesilhealth/Health_Benchmarks (held-out 10%)"),
    "medqa": (medqa, "test", "GBaker/MedQA-USMLE-4-options-hf"),
    "medmcqa": (medmcqa, "validation", "openlifescienceai/medmcqa"),
    "mmlu_medical": (mmlu_medical, "test", "cais/mmlu (6 medical subjects)"),
}
TRAINING_SOURCES = ("gsm8k", "pubmedqa", "health_benchmarks")  # those with a *_data_files config field


def load_eval_set(name: str, config: Any, data_files: Optional[Any] = None):
    """The evaluation split of source ``name`` as a ``datasets.Dataset`` (``SOURCES`` says which split).

    data_files: local files in the source's hub schema (None = the hub, or for the three training
    sources the ``<name>_data_files`` of ``config``). config: uses ``<name>_data_files`` of the three
    training sources. Raises DataError naming the source and the flag that gives local files.
    """
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    module, split, hub = SOURCES[name]
    if name in TRAINING_SOURCES and data_files is None:
        data_files = getattr(config, f"{name}_data_files", None)
    if data_files is not None:
        return module.load(split, data_files)
    try:
        return module.load(split)
    except DataError:  # the loader's own one-line message already names the flag
        raise
    except Exception as err:  # offline, a wrong hub id, no access: one line naming the way out
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise DataError(
            f"{name}: cannot load {hub} from the hub ({type(err).__name__}: {first_line}); "
            f"offline, give local files in its hub schema with --{name}_data_files"
        ) from err


def evenly_spaced(n_rows: int, limit: Optional[int]) -> list[int]:
    """Indices of ``limit`` rows spread evenly over ``n_rows`` (all of them when limit is None or larger).

    Evenly spaced rather than the first ``limit``: a source stored in blocks (Health_Benchmarks by
    specialty, MMLU by subject) is then sampled across its blocks. Example: (10, 4) -> [0, 2, 5, 7].
    """
    if limit is None or limit >= n_rows:
        return list(range(n_rows))
    if limit < 1:
        raise DataError(f"--limit {limit}: must be >= 1")
    return [i * n_rows // limit for i in range(limit)]
