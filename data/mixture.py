"""The training stream (three sources mixed by probability) and the evaluation sets.

``build_train_dataset(config, tokenizer)`` returns a ``MixtureStream``: an endless, seeded sequence of
rows that the trainer reads by position (``stream[i]``, ``stream.rows(start, count)``), so an exact
resume only needs the position it stopped at. Epoch ``e`` of the stream is

    interleave_datasets([shuffled pubmedqa, shuffled gsm8k, shuffled health_benchmarks],
                        probabilities=dataset_mixture, seed=f(seed, e), stopping_strategy="all_exhausted")

with every source re-shuffled by a seed derived from ``(seed, e, source)``; epoch ``e + 1`` follows
epoch ``e``. Why ``"all_exhausted"``: every row of every source is visited at least once per epoch
(the sources that run out first are cycled meanwhile), and the source of each row is drawn with the configured probabilities
from the first row to the last. ``"first_exhausted"`` would end an epoch as soon as one source ran out,
so the unseen rows of the big source (PubMedQA) would only be reached by chance in later epochs.
A source with probability 0 is left out (``all_exhausted`` could never exhaust it).

``build_eval_datasets(config, tokenizer)`` returns ``{"pubmedqa", "gsm8k", "med_mc"}`` -> Dataset (keys
are the ``db_set`` values): the 500 official PubMedQA test questions, GSM8K test, and the held-out 10%
of every Health_Benchmarks specialty. The training stream never contains an evaluation prompt: the
loaders split the sources that way, and ``build_train_dataset`` also drops any training row whose user
message equals an evaluation one (a guard against duplicated questions and mis-pointed local files).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any, Optional

import datasets
import numpy as np

from data import custom, gsm8k, health_benchmarks, pubmedqa
from data.common import DataError
from data.prompts import filter_long_prompts

logger = logging.getLogger(__name__)

# The order of GRPOConfig.dataset_mixture.
SOURCES = ("pubmedqa", "gsm8k", "health_benchmarks")
DB_SETS = {"pubmedqa": pubmedqa.DB_SET, "gsm8k": gsm8k.DB_SET, "health_benchmarks": health_benchmarks.DB_SET}


def load_source(name: str, split: str, config: Any) -> datasets.Dataset:
    """One source's split, with the data files and options that ``config`` names.

    config: uses pubmedqa_data_files, pubmedqa_max_context_chars, gsm8k_data_files,
    health_benchmarks_data_files.
    """
    if name == "pubmedqa":
        return pubmedqa.load(
            split, config.pubmedqa_data_files, max_context_chars=config.pubmedqa_max_context_chars
        )
    if name == "gsm8k":
        return gsm8k.load(split, config.gsm8k_data_files)
    if name == "health_benchmarks":
        return health_benchmarks.load(split, config.health_benchmarks_data_files)
    raise DataError(f"unknown data source {name!r}; known: {', '.join(SOURCES)}")


def _drop_long(ds: datasets.Dataset, tokenizer, max_prompt_length: int, what: str) -> datasets.Dataset:
    if tokenizer is None:  # no tokenizer: no length filter (tests of the mixture itself)
        return ds
    ds, n_dropped = filter_long_prompts(ds, tokenizer, max_prompt_length)
    if n_dropped:
        logger.warning(
            "%s: dropped %d prompt(s) longer than max_prompt_length=%d tokens",
            what,
            n_dropped,
            max_prompt_length,
        )
    if len(ds) == 0:
        raise DataError(f"{what}: every prompt is longer than max_prompt_length={max_prompt_length} tokens")
    return ds


def build_eval_datasets(config: Any, tokenizer) -> dict[str, datasets.Dataset]:
    """``{db_set: Dataset}`` of the evaluation splits, long prompts dropped (``tokenizer=None``: kept).

    config: uses dataset_mixture (sources of probability 0 are left out), gsm8k_data_files,
    pubmedqa_data_files, health_benchmarks_data_files, pubmedqa_max_context_chars, max_prompt_length.
    """
    if config.dataset_name:
        if not config.dataset_test_split:
            return {}
        test = custom.load(config.dataset_test_split, config.dataset_name, config_name=config.dataset_config)
        return {
            name: _drop_long(rows, tokenizer, config.max_prompt_length, f"dataset_name ({name}, test)")
            for name, rows in custom.split_by_db_set(test).items()
        }
    return {
        DB_SETS[name]: _drop_long(
            load_source(name, "test", config), tokenizer, config.max_prompt_length, f"{name} (test)"
        )
        for name, p in zip(SOURCES, config.dataset_mixture, strict=True)
        if p > 0  # a source left out of training (probability 0) is not evaluated during it either
    }


def _user_message(prompt: list[dict]) -> str:
    return prompt[-1]["content"]


def _not_in(prompt: list[dict], messages: set[str]) -> bool:
    return _user_message(prompt) not in messages


def build_train_dataset(config: Any, tokenizer) -> MixtureStream:
    """The endless training stream of ``config``: sources with probability > 0, long prompts dropped,
    evaluation prompts excluded, mixed by ``config.dataset_mixture`` with ``config.seed``.

    config: uses dataset_mixture, seed, max_prompt_length, pubmedqa_max_context_chars and the three
    ``*_data_files``.
    """
    if (
        config.dataset_name
    ):  # a user's own dataset replaces the three built-in sources (dataset_mixture unused)
        return _custom_stream(config, tokenizer)
    probabilities = dict(zip(SOURCES, config.dataset_mixture, strict=True))
    sources: dict[str, datasets.Dataset] = {}
    for name, p in probabilities.items():
        if p <= 0:
            continue
        train = load_source(name, "train", config)
        eval_messages = {_user_message(p) for p in load_source(name, "test", config)["prompt"]}
        n_before = len(train)
        train = train.filter(_not_in, fn_kwargs={"messages": eval_messages}, input_columns="prompt")
        if len(train) < n_before:
            logger.warning(
                "%s: removed %d training row(s) whose prompt is in the evaluation set",
                name,
                n_before - len(train),
            )
        if len(train) == 0:
            raise DataError(f"{name}: every training row is also an evaluation row (check {name}_data_files)")
        sources[name] = _drop_long(train, tokenizer, config.max_prompt_length, f"{name} (train)")
    return MixtureStream(sources, {n: probabilities[n] for n in sources}, seed=config.seed)


class MixtureStream:
    """An endless, reproducible mixture of datasets, indexed by position.

    ``stream[i]`` is a row dict (``prompt``, ``answer``, ``db_set``), the same for the same sources,
    probabilities and seed, whatever was read before: a resumed run reads from its saved position.
    Epoch lengths are random (they depend on the draws), so ``locate(i)`` walks the epochs from the
    start, building each one's index once (cheap: an index array over the concatenated sources).

    >>> stream = MixtureStream({"a": ds_a, "b": ds_b}, {"a": 0.5, "b": 0.5}, seed=0)  # doctest: +SKIP
    >>> stream.rows(0, 4)  # the first four rows  # doctest: +SKIP
    """

    def __init__(self, sources: dict[str, datasets.Dataset], probabilities: dict[str, float], seed: int):
        names = [n for n in sources if probabilities.get(n, 0) > 0]
        if not names:
            raise DataError("dataset_mixture: no source has a probability > 0")
        for n in names:
            if len(sources[n]) == 0:
                raise DataError(f"{n}: no training row")
        total = sum(probabilities[n] for n in names)
        self.names = names
        self.sources = {n: sources[n] for n in names}
        self.probabilities = [probabilities[n] / total for n in names]
        self.seed = int(seed)
        self._epoch_lengths: list[int] = []
        self._cached_epoch: Optional[tuple[int, datasets.Dataset]] = None

    def _seed(self, epoch: int, k: int) -> int:
        """A 32-bit seed per (run seed, epoch, source index k); k = len(names) seeds the interleave."""
        return int(np.random.SeedSequence([self.seed, epoch, k]).generate_state(1)[0])

    def epoch(self, epoch: int) -> datasets.Dataset:
        """Epoch ``epoch`` of the stream: every source re-shuffled, interleaved until all are exhausted."""
        if self._cached_epoch is not None and self._cached_epoch[0] == epoch:
            return self._cached_epoch[1]
        shuffled = [self.sources[n].shuffle(seed=self._seed(epoch, k)) for k, n in enumerate(self.names)]
        mixed = datasets.interleave_datasets(
            shuffled,
            probabilities=self.probabilities,
            seed=self._seed(epoch, len(self.names)),
            stopping_strategy="all_exhausted",
        )
        self._cached_epoch = (epoch, mixed)
        return mixed

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, offset in that epoch) of a stream position."""
        if position < 0:
            raise IndexError(f"stream position {position} < 0")
        start = 0
        for epoch in itertools.count():
            if epoch == len(self._epoch_lengths):
                self._epoch_lengths.append(len(self.epoch(epoch)))
            if position < start + self._epoch_lengths[epoch]:
                return epoch, position - start
            start += self._epoch_lengths[epoch]
        raise AssertionError("unreachable")

    def __getitem__(self, position: int) -> dict:
        epoch, offset = self.locate(position)
        return self.epoch(epoch)[offset]

    def rows(self, start: int, count: int) -> list[dict]:
        """``count`` consecutive rows from position ``start`` (a batch of prompts)."""
        return [self[i] for i in range(start, start + count)]

    def __iter__(self) -> Iterator[dict]:
        for epoch in itertools.count():
            yield from self.epoch(epoch)


def _custom_stream(config: Any, tokenizer) -> MixtureStream:
    """The training stream of a user's own dataset (config.dataset_name), its test split held out."""

    def load(split: str) -> datasets.Dataset:
        return custom.load(split, config.dataset_name, config_name=config.dataset_config)

    train = load(config.dataset_train_split)
    if config.dataset_test_split:
        eval_messages = {_user_message(p) for p in load(config.dataset_test_split)["prompt"]}
        train = train.filter(_not_in, fn_kwargs={"messages": eval_messages}, input_columns="prompt")
        if len(train) == 0:
            raise DataError("dataset_name: every training row is also in dataset_test_split")
    train = _drop_long(train, tokenizer, config.max_prompt_length, "dataset_name (train)")
    return MixtureStream({"custom": train}, {"custom": 1.0}, seed=config.seed)
