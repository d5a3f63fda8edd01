"""Reward functions by name, by import path, or as callables, and ``combine_rewards`` that runs them all.

Two calling conventions are accepted, and a function gets only the arguments it declares:

- ours, ``f(completions, **columns)``: the completions and the dataset columns (``answer``, ``db_set``, ...);
- TRL's, ``f(prompts, completions, completion_ids, **kwargs)``: everything by keyword, as
  ``GRPOTrainer`` calls reward functions (TRL's ``trainer_state`` / ``log_metric`` extras are not passed).

A function with ``**kwargs`` gets everything: completions, every column, ``prompts`` and
``completion_ids`` when the caller gave them, and any extra keyword given to ``combine_rewards``
(``max_completion_length=...`` for the overlong punishment). A function without ``**kwargs`` gets only
the names in its signature, so ``f(completions, answer)`` never sees ``db_set``.

A function returns one number per completion, or ``None`` where it does not apply (TRL's convention: left
out of the sum and of its mean). ``async def`` functions are awaited together, plain ones that set
``fn.thread_safe = True`` run in a thread pool, the others one after another (rewards/running.py); the
results are the same, in the same order, as running each alone. A function that raises, overruns the time
limit, or returns anything but a list of finite numbers or None is a ``RewardFuncError`` on one line that
names the function, the completion (its source and position) and what went wrong.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch

from rewards.answer import correctness_reward_func, int_reward_func
from rewards.format import soft_format_reward_func, strict_format_reward_func, xmlcount_reward_func
from rewards.length import soft_overlong_punishment_reward_func
from rewards.running import Call, Outcome, call_kind, run_calls

RewardFunc = Callable[..., list[Optional[float]]]


class RewardFuncError(ValueError):
    """A reward function that cannot be found or called, that fails, overruns its time limit, or whose
    result is not one finite number (or None) per completion; also a completion no function scores.

    ``row``: the index of the completion the error is about, when one is (a function may raise it with
    ``row=i`` to have that completion named in the message)."""

    def __init__(self, message: str, row: Optional[int] = None):
        super().__init__(message)
        self.row = row


# Keywords passed to the functions that hold one entry per completion (sliced to find a failing completion).
PER_COMPLETION_ARGUMENTS = ("prompts", "completion_ids")


# The five functions of the recipe. Keys equal grpo.config.REWARD_FUNC_NAMES, in the same order;
# combine_rewards runs these when no funcs are given.
REWARD_FUNCS: dict[str, RewardFunc] = {
    "xmlcount_reward_func": xmlcount_reward_func,
    "soft_format_reward_func": soft_format_reward_func,
    "strict_format_reward_func": strict_format_reward_func,
    "int_reward_func": int_reward_func,
    "correctness_reward_func": correctness_reward_func,
}
# Built-ins a config may name but that are not part of the recipe (they need more than completions and
# columns: see rewards/length.py for what the trainer must pass).
OPTIONAL_REWARD_FUNCS: dict[str, RewardFunc] = {
    "soft_overlong_punishment": soft_overlong_punishment_reward_func,
}
# Passed by keyword only (TRL's names): never taken for the completions slot of f(texts, **columns).
TRL_ARGUMENTS = ("prompts", "completion_ids")


def resolve_reward_func(spec: Union[str, RewardFunc]) -> RewardFunc:
    """The reward function that ``spec`` names.

    ``spec`` is a callable (returned as is), a built-in name (``REWARD_FUNCS``, ``OPTIONAL_REWARD_FUNCS``),
    or an import path: ``"package.module:function"`` (or TRL's dotted ``"package.module.function"``;
    ``"module:Class.method"`` also works). The module is imported as ``import`` would, so its folder must
    be on ``sys.path`` (installed, the working folder, or ``PYTHONPATH``). Raises ``RewardFuncError``
    naming the spec when the module cannot be imported, lacks the attribute, or it is not callable.

    >>> resolve_reward_func("int_reward_func").__name__
    'int_reward_func'
    >>> resolve_reward_func("rewards.format:count_xml").__name__
    'count_xml'
    """
    if callable(spec) and not isinstance(spec, str):
        return spec
    if not isinstance(spec, str):
        raise RewardFuncError(f"a reward function must be a name, an import path or a callable, got {spec!r}")
    if spec in REWARD_FUNCS:
        return REWARD_FUNCS[spec]
    if spec in OPTIONAL_REWARD_FUNCS:
        return OPTIONAL_REWARD_FUNCS[spec]
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
    else:
        module_name, _, attribute = spec.rpartition(".")
    if not module_name or not attribute:
        known = ", ".join([*REWARD_FUNCS, *OPTIONAL_REWARD_FUNCS])
        raise RewardFuncError(
            f"unknown reward function {spec!r}; known: {known}; or an import path 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # not found, or the user's module itself failed (SyntaxError, its own imports)
        not_found = isinstance(err, ModuleNotFoundError) and f"{module_name}.".startswith(f"{err.name}.")
        if not_found:
            raise RewardFuncError(
                f"reward function {spec!r}: cannot find module {module_name!r} ({err}); is its folder on "
                "sys.path (installed, the working folder, or PYTHONPATH)?"
            ) from err
        raise RewardFuncError(
            f"reward function {spec!r}: importing module {module_name!r} failed: {type(err).__name__}: {err}"
        ) from err
    func: Any = module
    for part in attribute.split("."):
        if not hasattr(func, part):
            raise RewardFuncError(
                f"reward function {spec!r}: module {module_name!r} has no attribute {attribute!r}"
            )
        func = getattr(func, part)
    if not callable(func):
        raise RewardFuncError(
            f"reward function {spec!r}: {attribute!r} is a {type(func).__name__}, not a callable"
        )
    return func


def reward_func_name(spec: Union[str, RewardFunc]) -> str:
    """The name ``combine_rewards`` reports a function under (``rewards/<name>/mean``): a string spec as
    written (``"correctness_reward_func"``, ``"mypkg.rewards:fn"``); a callable by its ``__name__`` (a
    ``functools.partial`` by the wrapped function's, an instance of a class without one by its class name).
    """
    if isinstance(spec, str):
        return spec
    while isinstance(spec, functools.partial):
        spec = spec.func
    return getattr(spec, "__name__", type(spec).__name__)


def reward_func_arguments(
    func: RewardFunc, completions: list, keywords: Mapping[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` to call ``func`` with: the completions, and of ``keywords`` (columns, prompts,
    completion_ids, extras) all when it takes ``**kwargs``, else those its signature names.

    The completions go by keyword when ``func`` has a ``completions`` parameter (or only ``**kwargs``, as
    TRL calls), else positionally into its first parameter (ours: ``f(texts, **columns)``).

    >>> def trl_style(prompts, completions, **kwargs): ...
    >>> reward_func_arguments(trl_style, ["c"], {"prompts": ["p"], "answer": ["7"]})
    ((), {'completions': ['c'], 'prompts': ['p'], 'answer': ['7']})
    >>> def ours(texts, answer): ...
    >>> reward_func_arguments(ours, ["c"], {"prompts": ["p"], "answer": ["7"]})
    ((['c'],), {'answer': ['7']})
    """
    try:
        parameters = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):  # no signature to read (some builtins): give it everything
        return (completions,), dict(keywords)
    named_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    takes_everything = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    named = {p.name for p in parameters if p.kind in named_kinds}
    chosen = {k: v for k, v in keywords.items() if takes_everything or k in named}

    first = parameters[0] if parameters else None
    first_takes_completions = (
        first is not None
        and first.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and first.name not in keywords
        and first.name not in TRL_ARGUMENTS
    )
    if "completions" in named:
        return (), {"completions": completions, **chosen}
    if first_takes_completions:
        return (completions,), chosen
    if takes_everything:
        return (), {"completions": completions, **chosen}
    return (), chosen


def check_arguments(
    func: RewardFunc, name: str, args: tuple, kwargs: dict, keywords: Mapping[str, Any]
) -> None:
    """RewardFuncError naming ``func`` when its signature cannot take ``(args, kwargs)`` (before it runs)."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # no signature to check against: let the call itself speak
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        given = ", ".join(["completions", *sorted(keywords)])
        raise RewardFuncError(
            f"reward function {name!r} cannot be called with what combine_rewards has ({given}): {err}"
        ) from err


def default_row_names(columns: Mapping[str, Sequence], n: int) -> list[str]:
    """How errors name completion i when the caller gives no names: ``row i`` and its ``db_set``.

    >>> default_row_names({"db_set": ["gsm8k", "med_mc"]}, 2)
    ['row 0 (gsm8k)', 'row 1 (med_mc)']
    """
    sources = columns.get("db_set")
    if sources is not None and len(sources) == n:
        return [f"row {i} ({source})" for i, source in enumerate(sources)]
    return [f"row {i}" for i in range(n)]


def describe_batch(row_names: Sequence[str]) -> str:
    """The completions of one call, in a few words: ``"row 0 (gsm8k)"`` for one, else the first and last.

    >>> describe_batch(["row 0 (gsm8k)", "row 1 (gsm8k)", "row 2 (med_mc)"])
    'a batch of 3 completions (row 0 (gsm8k) ... row 2 (med_mc))'
    """
    if len(row_names) == 1:
        return row_names[0]
    return f"a batch of {len(row_names)} completions ({row_names[0]} ... {row_names[-1]})"


def reward_tensor(values: Any, name: str, row_names: Sequence[str]) -> torch.Tensor:
    """A function's return value, checked, as float32 [N]: one finite number or None per completion, None
    read as NaN ("does not apply"). Anything else is a RewardFuncError naming the function and the row."""
    n = len(row_names)
    if hasattr(values, "tolist"):  # a torch tensor or numpy array
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardFuncError(
            f"reward function {name!r} returned {type(values).__name__}, not a list of {n} numbers"
        )
    if len(values) != n:
        raise RewardFuncError(
            f"reward function {name!r} returned {len(values)} values for {describe_batch(row_names)}"
        )
    rewards = []
    for index, value in enumerate(values):
        if value is None:
            rewards.append(math.nan)  # TRL: this function does not apply to this completion
            continue
        try:
            number = float(value)  # also numpy and 0-d torch scalars
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise RewardFuncError(
                f"reward function {name!r} returned {value!r} for {row_names[index]}; a reward must be a "
                "finite number, or None where the function does not apply",
                row=index,
            )
        rewards.append(number)
    return torch.tensor(rewards, dtype=torch.float32)


def failure(
    name: str,
    outcome: Outcome,
    row_names: Sequence[str],
    timeout: Optional[float],
    failing_row: Optional[int] = None,
) -> RewardFuncError:
    """The one-line error of a call that raised or overran ``timeout``. ``failing_row``: the completion it
    fails on alone, when the caller found one (``first_failing_row``)."""
    if outcome.timed_out:
        return RewardFuncError(
            f"reward function {name!r} did not return within reward_timeout={timeout:g} s on "
            f"{describe_batch(row_names)}"
        )
    err = outcome.error
    row = failing_row if failing_row is not None else getattr(err, "row", None)
    where = row_names[row] if row is not None and 0 <= row < len(row_names) else describe_batch(row_names)
    detail = str(err).strip() or "(no message)"
    return RewardFuncError(
        f"reward function {name!r} raised {type(err).__name__}: {detail} on {where}", row=row
    )


def slice_keywords(keywords: Mapping[str, Any], per_completion: Sequence[str], index: int) -> dict[str, Any]:
    """``keywords`` for completion ``index`` alone: one-entry lists of the per-completion ones."""
    return {k: ([v[index]] if k in per_completion else v) for k, v in keywords.items()}


def first_failing_row(
    func: RewardFunc,
    completions: list,
    keywords: Mapping[str, Any],
    per_completion: Sequence[str],
    timeout: Optional[float],
) -> Optional[int]:
    """The first completion on which ``func``, called on it alone, raises; None when none does (it fails on
    the batch only) or a call overruns ``timeout`` (the search stops there). Run after a failure only."""
    kind = call_kind(func)
    for index, completion in enumerate(completions):
        args, kwargs = reward_func_arguments(
            func, [completion], slice_keywords(keywords, per_completion, index)
        )
        outcome = run_calls([Call(func, args, kwargs, kind)], num_workers=1, timeout=timeout)[0]
        if outcome.timed_out:
            return None
        if outcome.error is not None:
            return index
    return None


def combine_rewards(
    completions: Sequence[Any],
    columns: Mapping[str, Sequence],
    funcs: Sequence[Union[str, RewardFunc]] = tuple(REWARD_FUNCS),
    weights: Optional[Sequence[float]] = None,
    *,
    num_workers: int = 4,
    timeout: Optional[float] = None,
    row_names: Optional[Sequence[str]] = None,
    **reward_kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Score N completions with every reward function and sum them with weights.

    Returns ``(total: [N] float32, per_func: {name: [N] float32})``; ``per_func`` holds the unweighted
    rewards (what ``rewards/<name>/mean`` logs), NaN where a function returned None ("does not apply");
    ``total = sum_k weights[k] * per_func[k]`` over the functions that apply (TRL's nansum; ``weights=None``:
    1.0 each). A completion no function applies to is a RewardFuncError. ``funcs`` are built-in names,
    import paths (``"mypkg.rewards:fn"``, see ``resolve_reward_func``) or callables, in our convention or
    TRL's (see the module docstring). Every extra keyword is passed to the functions that take it, TRL's
    ``prompts=`` (N entries) and ``completion_ids=`` (N lists of token ids, unpadded) as much as
    ``max_completion_length=1024``; None means not given.

    How they run: async functions together, thread-safe ones (``fn.thread_safe = True``) on ``num_workers``
    threads (0: in turn), the others in turn (rewards/running.py); ``timeout`` seconds per function call
    (None: no limit). ``row_names``: how errors name each completion (default ``"row i (db_set)"``; the
    trainer names the prompt's place in the training stream). A function that raises is called again on
    one completion at a time to find the first one it fails on, so the error can name it.

    Example: one completion ``"<reasoning>\\nr\\n</reasoning>\\n<answer>\\n7\\n</answer>\\n"`` with
    ``answer=["7"], db_set=["gsm8k"]`` scores 0.5 on each format reward, 0.5 on int and 2.0 on
    correctness: total 4.0 with the default weights. A function returning ``[None]`` beside them leaves
    the total at 4.0.
    """
    resolved = [(reward_func_name(spec), resolve_reward_func(spec)) for spec in funcs]
    names = [name for name, _ in resolved]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise RewardFuncError(f"reward functions named twice: {repeated}; each needs its own name")
    weights = [1.0] * len(resolved) if weights is None else list(weights)
    if len(weights) != len(resolved):
        raise RewardFuncError(f"{len(weights)} reward weights for {len(resolved)} reward functions")

    keywords = dict(columns)
    if "completions" in keywords:
        raise RewardFuncError(
            "a dataset column may not be named 'completions' (the reward functions' argument)"
        )
    for key, value in reward_kwargs.items():  # prompts, completion_ids, max_completion_length, ...
        if value is None:
            continue
        if key in keywords:
            raise RewardFuncError(
                f"{key!r} is given both as a dataset column and as an argument of combine_rewards"
            )
        keywords[key] = value

    completions = list(completions)
    row_names = default_row_names(columns, len(completions)) if row_names is None else list(row_names)
    if len(row_names) != len(completions):
        raise ValueError(f"{len(row_names)} row_names for {len(completions)} completions")
    calls = []
    for name, func in resolved:
        args, kwargs = reward_func_arguments(func, completions, keywords)
        check_arguments(func, name, args, kwargs, keywords)
        calls.append(Call(func, args, kwargs, call_kind(func)))

    outcomes = run_calls(calls, num_workers, timeout)
    per_func: dict[str, torch.Tensor] = {}
    for (name, func), outcome in zip(resolved, outcomes, strict=True):
        if outcome.timed_out or outcome.error is not None:
            row = None
            if outcome.error is not None and not isinstance(outcome.error, RewardFuncError):
                per_completion = [*columns, *PER_COMPLETION_ARGUMENTS]
                row = first_failing_row(func, completions, keywords, per_completion, timeout)
            raise failure(name, outcome, row_names, timeout, row) from outcome.error
        per_func[name] = reward_tensor(outcome.value, name, row_names)

    table = torch.stack(list(per_func.values()), dim=1)  # [N, K], NaN where a function does not apply
    unscored = torch.isnan(table).all(dim=1).nonzero()
    if len(unscored) > 0:
        row = int(unscored[0])
        raise RewardFuncError(
            f"no reward function applies to {row_names[row]}: {', '.join(map(repr, names))} all returned "
            "None for it; every completion needs a reward from at least one function",
            row=row,
        )
    total = (table * torch.tensor(weights, dtype=torch.float32)).nansum(dim=1)
    return total, per_func
