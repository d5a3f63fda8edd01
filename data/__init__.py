"""The three training sources, their prompts, the mixture and the evaluation splits (docs/DATA.md).

- ``data.gsm8k``, ``data.pubmedqa``, ``data.health_benchmarks``: ``load(split, data_files=None)`` ->
  ``datasets.Dataset`` with columns ``prompt`` (system + user message), ``answer``, ``db_set``.
- ``data.prompts``: the recipe's prompts and ``filter_long_prompts``.
- ``data.mixture``: ``build_train_dataset`` (an endless, seeded ``MixtureStream``) and ``build_eval_datasets``.
- ``data.common``: what the loaders share (local files, malformed-row handling, ``DataError``).
"""
