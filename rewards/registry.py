"""Reward functions by name, by import path, or as callables, and ``combine_rewards`` that runs them all.

Two calling conventions are accepted, and a function gets only the arguments it declares:

- ours, ``f(completions, **columns)``: the completions and the dataset columns (``answer``, ``db_set``, ...);
- TRL's, ``f(prompts, completions, completion_ids, **kwargs)``: everything by keyword, as
  ``GRPOTrainer`` calls reward functions (TRL's ``trainer_state`` / ``log_metric`` extras are not passed).

A function with ``**kwargs`` gets everything: completions, every column, ``prompts`` and
``completion_ids`` when the caller gave them, and any extra keyword given to ``combine_rewards``
(``max_completion_length=...`` for the overlong punishment). A function without ``**kwargs`` gets only
the names in its signature, so ``f(completions, answer)`` never sees ``db_set``.
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

RewardFunc = Callable[..., list[float]]


class RewardFuncError(ValueError):
    """A reward function that cannot be found, called, or whose result is not one number per completion."""


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


def call_reward_func(
    func: RewardFunc, name: str, completions: list, keywords: Mapping[str, Any]
) -> torch.Tensor:
    """``func`` on the completions (arguments chosen by ``reward_func_arguments``), checked: one finite
    number per completion. Returns them as a float32 tensor [N]."""
    args, kwargs = reward_func_arguments(func, completions, keywords)
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # no signature to check against: let the call itself speak
        signature = None
    if signature is not None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as err:
            given = ", ".join(["completions", *sorted(keywords)])
            raise RewardFuncError(
                f"reward function {name!r} cannot be called with what combine_rewards has ({given}): {err}"
            ) from err
    values = func(*args, **kwargs)
    n = len(completions)
    if hasattr(values, "tolist"):  # a torch tensor or numpy array
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardFuncError(
            f"reward function {name!r} returned {type(values).__name__}, not a list of {n} numbers"
        )
    if len(values) != n:
        raise RewardFuncError(f"reward function {name!r} returned {len(values)} values for {n} completions")
    rewards = []
    for index, value in enumerate(values):
        try:
            number = float(value)  # also numpy and 0-d torch scalars
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            # TRL reads None as "does not apply" and skips it with nansum; a GRPO advantage needs a number.
            raise RewardFuncError(
                f"reward function {name!r} returned {value!r} for completion {index}; every reward must be a "
                "finite number"
            )
        rewards.append(number)
    return torch.tensor(rewards, dtype=torch.float32)


def combine_rewards(
    completions: Sequence[Any],
    columns: Mapping[str, Sequence],
    funcs: Sequence[Union[str, RewardFunc]] = tuple(REWARD_FUNCS),
    weights: Optional[Sequence[float]] = None,
    *,
    prompts: Optional[Sequence[Any]] = None,
    completion_ids: Optional[Sequence[Sequence[int]]] = None,
    **reward_kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Score N completions with every reward function and sum them with weights.

    Returns ``(total: [N] float32, per_func: {name: [N] float32})``; ``per_func`` holds the unweighted
    rewards (what ``rewards/<name>/mean`` logs), ``total = sum_k weights[k] * per_func[k]``
    (``weights=None``: 1.0 each). ``funcs`` are built-in names, import paths (``"mypkg.rewards:fn"``, see
    ``resolve_reward_func``) or callables, in our convention or TRL's (see the module docstring).
    ``prompts`` (N entries) and ``completion_ids`` (N lists of token ids, unpadded) are passed to the
    functions that take them; so is every extra keyword (``max_completion_length=1024``).

    Example: one completion ``"<reasoning>\\nr\\n</reasoning>\\n<answer>\\n7\\n</answer>\\n"`` with
    ``answer=["7"], db_set=["gsm8k"]`` scores 0.5 on each format reward, 0.5 on int and 2.0 on
    correctness: total 4.0 with the default weights.
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
    for key, value in (("prompts", prompts), ("completion_ids", completion_ids), *reward_kwargs.items()):
        if value is None:
            continue
        if key in keywords:
            raise RewardFuncError(
                f"{key!r} is given both as a dataset column and as an argument of combine_rewards"
            )
        keywords[key] = value

    completions = list(completions)
    total = torch.zeros(len(completions), dtype=torch.float32)
    per_func: dict[str, torch.Tensor] = {}
    for (name, func), weight in zip(resolved, weights, strict=True):
        rewards = call_reward_func(func, name, completions, keywords)
        per_func[name] = rewards
        total += weight * rewards
    return total, per_func
