"""The GRPO family in one table: what each ``loss_type`` is made of.

Each objective is the same pipeline (``grpo.loss.policy_loss``) with four pieces chosen per row of
``OBJECTIVES``:

- ``term``: its policy term, a function of grpo/surrogates.py registered under that name in
  ``POLICY_TERMS`` (verl's ``register_policy_loss``);
- ``aggregation``: how ``grpo.loss.aggregate`` turns the [N, T] token losses into one number
  (verl's ``loss_agg_mode`` names);
- ``clipped``: whether the term is PPO's clipped ratio, the one ``delta`` and ``clip_ratio_c`` act on;
- ``own_corrections``: the corrections (``CORRECTIONS``) the term applies itself, in its own way, so
  that ``policy_loss`` does not multiply them in again afterwards.

Everything else is derived from the table, here: ``LOSS_TYPES``, ``CLIPPED_LOSS_TYPES`` and the
compatibility rules: ``objective_problems`` (which config validation, grpo/validation.py, and
``LossSettings`` both apply) and ``level_problems`` (config validation's). docs/OBJECTIVES.md shows the
same table (a test keeps the two in step).

This module imports no torch: validating a config reads the table before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# verl's loss_agg_mode names; grpo.loss.aggregate implements each (N sequences, M real tokens, L = max length):
AGGREGATIONS = (
    "seq-mean-token-mean",  # mean over sequences of each sequence's token mean (DeepSeekMath)
    "token-mean",  # sum over all tokens / M (every token weighs the same)
    "seq-mean-token-sum",  # mean over sequences of each sequence's token SUM
    "token-sum-norm",  # sum over all tokens / (N * L): a constant denominator (Dr. GRPO)
)
# The per-token corrections, in the order policy_loss multiplies them into the policy term (TRL's order).
CORRECTIONS = ("off_policy_mask", "entropy_mask", "is_weights")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass(frozen=True)
class Objective:
    """One row of the table: the pieces a ``loss_type`` is made of (see the module docstring)."""

    term: str  # a name in grpo.surrogates.POLICY_TERMS
    aggregation: str  # one of AGGREGATIONS
    paper: str
    clipped: bool = False  # PPO's clipped ratio: delta and clip_ratio_c apply
    own_corrections: tuple[str, ...] = ()  # of CORRECTIONS: applied by the term itself
    level: str | None = None  # the importance_sampling_level it is defined at (None = either)
    token_is_weights: bool = False  # needs per-token is_weights [N, T] (a token_* IS mode)


# vespo puts the IS weights into its sequence weight phi; gmpo takes their geometric mean over the tokens its
# entropy mask keeps (verl): both build their sequence weight from the token ratios themselves.
# fmt: off
OBJECTIVES: dict[str, Objective] = {
    "grpo":    Objective("ppo_clip", "seq-mean-token-mean", "DeepSeekMath, arXiv 2402.03300", clipped=True),
    "bnpo":    Objective("ppo_clip", "token-mean", "TRL's local-batch token mean", clipped=True),
    "dr_grpo": Objective("ppo_clip", "token-sum-norm", "Dr. GRPO, arXiv 2503.20783", clipped=True),
    "dapo":    Objective("ppo_clip", "token-mean", "DAPO, arXiv 2503.14476", clipped=True),
    "cispo":   Objective("cispo", "token-mean", "MiniMax-M1, arXiv 2506.13585"),
    "sapo":    Objective("sapo", "seq-mean-token-mean", "SAPO, arXiv 2511.20347"),
    "luspo":   Objective("ppo_clip", "seq-mean-token-sum", "LUSPO, arXiv 2602.05261", clipped=True,
                         level="sequence"),
    "vespo":   Objective("vespo", "token-mean", "VESPO, arXiv 2602.10693", own_corrections=("is_weights",),
                         level="token", token_is_weights=True),
    "gmpo":    Objective("gmpo", "seq-mean-token-mean", "GMPO, arXiv 2507.20673",
                         own_corrections=("entropy_mask", "is_weights"), level="token"),
}
# fmt: on

LOSS_TYPES = tuple(OBJECTIVES)
CLIPPED_LOSS_TYPES = tuple(name for name, objective in OBJECTIVES.items() if objective.clipped)
# Why an objective is defined at one level only, by that level.
LEVEL_RULES = {
    "sequence": "{loss_type} is a sequence-level loss: set importance_sampling_level: sequence",
    "token": "{loss_type} forms its sequence weight itself: keep importance_sampling_level: token",
}


def objective_problems(settings: Any) -> list[tuple[str, str]]:
    """The rules of the table that ``settings`` breaks, as (field, rule) pairs; [] when it breaks none.

    settings: a ``LossSettings`` or a ``GRPOConfig``: anything with the fields ``loss_type``,
    ``importance_sampling_level``, ``kl_estimator``, ``delta`` and ``clip_ratio_c`` (both share these names).
    ``LossSettings`` applies these; config validation applies them and ``level_problems``.

    Example: loss_type "sapo" with delta 4.0 -> [("delta", "acts on the clipped losses (grpo, ...), not sapo")].
    """
    for name, known in (
        ("loss_type", LOSS_TYPES),
        ("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS),
        ("kl_estimator", KL_ESTIMATORS),
    ):
        if getattr(settings, name) not in known:
            return [(name, f"must be one of {', '.join(known)}")]
    problems = []
    for name in ("delta", "clip_ratio_c"):
        if getattr(settings, name) is not None and not OBJECTIVES[settings.loss_type].clipped:
            clipped = ", ".join(CLIPPED_LOSS_TYPES)
            problems.append((name, f"acts on the clipped losses ({clipped}), not {settings.loss_type}"))
    return problems


def level_problems(settings: Any) -> list[tuple[str, str]]:
    """The config's rule on top of ``objective_problems``: an objective defined at one importance_sampling_level
    runs at that level. (``policy_loss`` itself also computes luspo per token and vespo per sequence, as TRL's
    ``_compute_loss`` does; gmpo's term refuses the sequence level.)

    Example: loss_type "luspo" at level "token" ->
    [("importance_sampling_level", "luspo is a sequence-level loss: set importance_sampling_level: sequence")].
    """
    level = OBJECTIVES[settings.loss_type].level
    if level is None or settings.importance_sampling_level == level:
        return []
    return [("importance_sampling_level", LEVEL_RULES[level].format(loss_type=settings.loss_type))]


@dataclass
class LossSettings:
    """The objective's settings: ``policy_loss``'s sixth argument (``GRPOConfig.loss_settings()`` makes it).

    The field names are ``policy_loss``'s keyword names; the config's names differ in three: ``epsilon``
    is eps_low, ``epsilon_high`` eps_high, ``use_bias_correction_kl`` bias_correction_kl. eps_high None
    means eps_low (set on construction). A combination that ``objective_problems`` rejects raises
    ValueError naming the field.
    """

    loss_type: str = "grpo"
    importance_sampling_level: str = "token"
    eps_low: float = 0.2
    eps_high: float | None = None
    delta: float | None = None  # caps the unclipped ratio (INTELLECT-2); clipped types only
    clip_ratio_c: float | None = None  # dual-clip PPO (verl); clipped types only
    beta: float = 0.0
    kl_estimator: str = "k3"
    max_completion_length: int | None = None  # dr_grpo's L (None = T)
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    bias_correction_kl: bool = False

    def __post_init__(self) -> None:
        if self.eps_high is None:
            self.eps_high = self.eps_low
        for name, rule in objective_problems(self)[:1]:
            raise ValueError(f"{name}={getattr(self, name)!r}: {rule}")

    @property
    def objective(self) -> Objective:
        return OBJECTIVES[self.loss_type]
