"""The DPO family's objectives: small frozen configs that turn sequence log-probs into per-example terms.

Each objective (`DPO`, `SimPO`, `ORPO`, `KTO`) holds its loss's hyperparameters and is the
`algorithm` section of a DPO-family run; a paired one is called on the chosen and rejected
`SequenceLogps` (and the reference's) and returns `PreferenceTerms`: per-example losses, implicit
rewards and the log-probs the loss consumed, which `rlhf_jax.steps.preference` reduces (the TRL
metrics by `rlhf_jax.losses.preference_metrics`). The math itself is in `rlhf_jax.losses`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

from rlhf_jax._checks import is_number
from rlhf_jax.config import ConfigError
from rlhf_jax.losses import dpo_loss, orpo_loss, simpo_loss
from rlhf_jax.losses.preference import DPOLossType

__all__ = ["SequenceLogps", "PreferenceTerms", "DPO", "SimPO", "ORPO", "KTO", "Objective"]


class SequenceLogps(NamedTuple):
    """Summed target log-probs and target counts of a set of completions, float32 `[N]`."""

    sum: jax.Array
    count: jax.Array

    def value(self, average: bool) -> jax.Array:
        """The summed log-prob, or the length-averaged one (`sum / count`, 0 for empty)."""
        return self.sum / jnp.maximum(self.count, 1.0) if average else self.sum


class PreferenceTerms(NamedTuple):
    """What an objective returns per example: the loss and what the metrics report.

    losses `[N]`; chosen_rewards / rejected_rewards `[N]` implicit rewards; chosen_logps /
    rejected_logps `[N]` the log-probs the loss consumed; extra: more per-example metrics.
    """

    losses: jax.Array
    chosen_rewards: jax.Array
    rejected_rewards: jax.Array
    chosen_logps: jax.Array
    rejected_logps: jax.Array
    extra: dict[str, jax.Array]


def _fail(owner: str, name: str, message: str):
    """`ConfigError("algorithm.<name> (<owner>) <message>")`: objectives are a run's algorithm section."""
    raise ConfigError(f"algorithm.{name} ({owner}) {message}")


def _positive(owner: str, name: str, value: float) -> None:
    _finite(owner, name, value)
    if not value > 0:
        _fail(owner, name, f"must be > 0, got {value!r}")


def _nonnegative(owner: str, name: str, value: float) -> None:
    _finite(owner, name, value)
    if not value >= 0:
        _fail(owner, name, f"must be >= 0, got {value!r}")


def _finite(owner: str, name: str, value: float) -> None:
    """A number (a string failed on the comparison without the key) other than +-inf (every loss would
    be non-finite, and the NaN/Inf guard would skip every update); nan is left to the range checks."""
    if not is_number(value) or value in (math.inf, -math.inf):
        _fail(owner, name, f"must be a finite number, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPO:
    """Direct Preference Optimization (Rafailov et al. 2023) and its loss variants (`dpo_loss`).

    Attributes:
      beta: implicit-reward scale.
      loss_type: `sigmoid`, `robust`, `hinge`, `ipo` (on length-averaged log-probs, as the IPO
        paper), `apo_zero`, `apo_down`.
      label_smoothing: conservative / robust DPO's label-flip rate.
      reference_free: drop the reference model (log-ratios against a uniform reference).
      nll_weight: add `nll_weight x` the chosen responses' token-mean NLL (RPO; Pang et al. 2024).
    """

    beta: float = 0.1
    loss_type: DPOLossType = "sigmoid"
    label_smoothing: float = 0.0
    reference_free: bool = False
    nll_weight: float = 0.0
    paired = True

    def __post_init__(self):
        if self.loss_type not in get_args(DPOLossType):
            _fail("DPO", "loss_type", f"must be one of {get_args(DPOLossType)}, got {self.loss_type!r}")
        _positive("DPO", "beta", self.beta)
        _nonnegative("DPO", "nll_weight", self.nll_weight)
        if not 0 <= self.label_smoothing < 0.5:
            _fail("DPO", "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            _fail("DPO", "label_smoothing", f"applies to loss_type 'sigmoid' and 'robust' only, got "
                  f"{self.label_smoothing!r} with loss_type {self.loss_type!r}")

    @property
    def needs_reference(self) -> bool:
        return not self.reference_free

    def __call__(self, chosen: SequenceLogps, rejected: SequenceLogps,
                 ref_chosen: SequenceLogps | None, ref_rejected: SequenceLogps | None) -> PreferenceTerms:
        avg = self.loss_type == "ipo"
        pc, pr = chosen.value(avg), rejected.value(avg)
        rc = None if ref_chosen is None else ref_chosen.value(avg)
        rr = None if ref_rejected is None else ref_rejected.value(avg)
        losses, _ = dpo_loss(pc, pr, rc, rr, beta=self.beta, loss_type=self.loss_type,
                             label_smoothing=self.label_smoothing)
        c = pc if rc is None else pc - rc
        r = pr if rr is None else pr - rr
        return PreferenceTerms(losses, self.beta * c, self.beta * r, pc, pr, {})


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimPO:
    """SimPO (Meng et al. 2024): reference-free margin loss on length-averaged log-probs.

    Attributes:
      beta: reward scale; gamma: target margin; nll_weight: chosen-NLL weight (CPO-SimPO).
    """

    beta: float = 2.0
    gamma: float = 0.5
    nll_weight: float = 0.0
    paired = True
    needs_reference = False

    def __post_init__(self):
        _positive("SimPO", "beta", self.beta)
        _nonnegative("SimPO", "nll_weight", self.nll_weight)

    def __call__(self, chosen, rejected, ref_chosen, ref_rejected) -> PreferenceTerms:
        del ref_chosen, ref_rejected
        a_w, a_l = chosen.value(True), rejected.value(True)
        losses = simpo_loss(a_w, a_l, beta=self.beta, gamma=self.gamma)
        return PreferenceTerms(losses, self.beta * a_w, self.beta * a_l, a_w, a_l, {})


@dataclasses.dataclass(frozen=True, kw_only=True)
class ORPO:
    """ORPO (Hong et al. 2024): chosen NLL + `beta x` the odds-ratio term, no reference model.

    Attributes:
      beta: weight of the odds-ratio term (the paper's lambda).
    """

    beta: float = 0.1
    paired = True
    needs_reference = False
    nll_weight = 1.0

    def __post_init__(self):
        _positive("ORPO", "beta", self.beta)

    def __call__(self, chosen, rejected, ref_chosen, ref_rejected) -> PreferenceTerms:
        del ref_chosen, ref_rejected
        a_w, a_l = chosen.value(True), rejected.value(True)
        losses, _ = orpo_loss(a_w, a_l, beta=self.beta)
        extra = {"log_odds_ratio": jax.lax.stop_gradient(-losses / self.beta)}
        return PreferenceTerms(losses, self.beta * a_w, self.beta * a_l, a_w, a_l, extra)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KTO:
    """KTO (Ethayarajh et al. 2024) on unpaired desirable / undesirable completions.

    Attributes:
      beta: implicit-reward scale.
      desirable_weight, undesirable_weight: the paper's lambda_D, lambda_U.
      reference_point: `mismatched` estimates z0 = max(0, KL) from the batch's mismatched
        completions (`kl_tokens`, `kl_loss_mask`); `zero` uses z0 = 0.
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference_point: Literal["mismatched", "zero"] = "mismatched"
    paired = False
    needs_reference = True
    nll_weight = 0.0

    def __post_init__(self):
        _positive("KTO", "beta", self.beta)
        _nonnegative("KTO", "desirable_weight", self.desirable_weight)
        _nonnegative("KTO", "undesirable_weight", self.undesirable_weight)
        if self.reference_point not in ("mismatched", "zero"):
            _fail("KTO", "reference_point", f"must be 'mismatched' or 'zero', got {self.reference_point!r}")


Objective = DPO | SimPO | ORPO | KTO
