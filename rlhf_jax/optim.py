"""Optimizers from a config: optax transforms with learning-rate schedules and gradient clipping.

`make_optimizer(OptimizerConfig(...))` returns one `optax.GradientTransformation`:
`chain(clip_by_global_norm(max_grad_norm), <optimizer>(learning_rate=schedule))`.

Example:
    >>> config = OptimizerConfig(name="adamw", learning_rate=1e-5, warmup_steps=100,
    ...                          schedule="cosine", decay_steps=10_000, max_grad_norm=1.0)
    >>> tx = make_optimizer(config)
    >>> lr_at = make_schedule(config)                    # lr_at(step) -> f32[]
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.config import ConfigError

__all__ = ["OptimizerName", "ScheduleName", "OptimizerConfig", "make_schedule", "make_optimizer", "adafactor",
           "decay_mask"]

OptimizerName = Literal["adamw", "adam", "sgd", "lion", "adafactor"]
ScheduleName = Literal["constant", "linear", "cosine"]
DecayMask = Literal["all", "no_norms_or_biases"]


def _fail(field: str, message: str):
    raise ConfigError(f"OptimizerConfig.{field} {message}")


# Every float field must be a finite real number (max_grad_norm may also be None): an inf learning
# rate or a nan epsilon would otherwise reach the first update (loss and gradient stay finite, so
# the step's NaN guard cannot see it).
_FLOAT_FIELDS = ("learning_rate", "end_learning_rate_ratio", "b1", "b2", "eps", "weight_decay", "momentum",
                 "max_grad_norm")


# The optimizer settings each optimizer reads (`make_optimizer`); any other one left away from its
# default would be silently ignored, so it is refused (weight decay has its own check).
_TUNED_FIELDS = ("b1", "b2", "eps", "momentum", "nesterov")
_READS = {"adamw": {"b1", "b2", "eps"}, "adam": {"b1", "b2", "eps"}, "sgd": {"momentum", "nesterov"},
          "lion": {"b1", "b2"}, "adafactor": set()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Optimizer, learning-rate schedule and clipping of a training run.

    The learning rate rises linearly from 0 to `learning_rate` over `warmup_steps`, then follows
    `schedule` for `decay_steps` steps (counted after warm-up) down to
    `learning_rate * end_learning_rate_ratio`, and stays there.

    From transformers' `get_scheduler(name, num_warmup_steps=W, num_training_steps=N)`: the same
    rates step for step with `warmup_steps=W, decay_steps=N - W` (`linear`, `cosine`,
    `constant_with_warmup`; `cosine_with_min_lr`'s `min_lr_rate` is `end_learning_rate_ratio`),
    the first update using the rate at 0 (0 with warm-up) as the Trainer's does. Past
    `N` transformers' cosine rises again; this one stays at its end rate. Steps count optimizer
    updates: one per training step for SFT, reward models and DPO, but `num_epochs x
    num_minibatches` per step for PPO and the GRPO family (TRL's PPO trainer advances its
    schedule once per rollout batch instead).

    Attributes:
      name: `adamw` (Loshchilov & Hutter 2019), `adam` (Kingma & Ba 2015), `sgd` (with
        `momentum`, optionally `nesterov`), `lion` (Chen et al. 2023), `adafactor` (Shazeer &
        Stern 2018, with `learning_rate` as an absolute step as in transformers' Trainer: `adafactor`).
      learning_rate: peak learning rate, finite and > 0.
      schedule: shape after warm-up: `constant`, `linear` decay or `cosine` decay.
      warmup_steps: linear warm-up length (0 = none).
      decay_steps: length of the linear / cosine decay; required by those schedules.
      end_learning_rate_ratio: final learning rate as a fraction of the peak.
      b1, b2, eps: Adam / Lion moment coefficients and Adam's epsilon; `b2` None is each
        optimizer's published default (`beta2`: 0.999 for Adam, 0.99 for Lion).
      weight_decay: decoupled weight decay (adamw, lion, adafactor).
      weight_decay_mask: `all` parameters (the default, optax's), or `no_norms_or_biases` (skip
        leaves named `scale` or ending in `bias`: the Hugging Face Trainer's rule, which it always
        applies; set it when porting a Trainer run with `weight_decay > 0`).
      momentum, nesterov: SGD's momentum (0 = plain SGD); `nesterov` needs momentum > 0.
      max_grad_norm: clip the global gradient norm to this value; None = no clipping.

    Every float is checked finite (and in its range) here; a bad value raises `ConfigError`
    naming the field. So does a setting the run would silently ignore: `decay_steps` or a
    nonzero `end_learning_rate_ratio` with the constant schedule, and `b1`, `b2`, `eps`,
    `momentum`, `nesterov` or `weight_decay` set away from their defaults for an optimizer that
    does not read them (`b1`/`b2` are read by adamw, adam and lion, `eps` by adamw and adam,
    `momentum`/`nesterov` by sgd; adafactor reads none of them).
    """

    name: OptimizerName = "adamw"
    learning_rate: float = 1e-5
    schedule: ScheduleName = "constant"
    warmup_steps: int = 0
    decay_steps: int | None = None
    end_learning_rate_ratio: float = 0.0
    b1: float = 0.9
    b2: float | None = None
    eps: float = 1e-8
    weight_decay: float = 0.0
    weight_decay_mask: DecayMask = "all"
    momentum: float = 0.0
    nesterov: bool = False
    max_grad_norm: float | None = 1.0

    @property
    def beta2(self) -> float:
        """The `b2` the optimizer runs with: as set, else 0.999 (Adam, Kingma & Ba) or 0.99 (Lion, Chen et al.)."""
        if self.b2 is not None:
            return self.b2
        return 0.99 if self.name == "lion" else 0.999

    def __post_init__(self):
        for field, literal in (("name", OptimizerName), ("schedule", ScheduleName), ("weight_decay_mask", DecayMask)):
            if getattr(self, field) not in get_args(literal):
                _fail(field, f"must be one of {get_args(literal)}, got {getattr(self, field)!r}")
        for field in _FLOAT_FIELDS:
            value = getattr(self, field)
            if value is None and field in ("max_grad_norm", "b2"):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                _fail(field, f"must be a number, got {value!r}")
            if not math.isfinite(value):
                _fail(field, f"must be a finite number, got {value!r}")
        if not self.learning_rate > 0:
            _fail("learning_rate", f"must be > 0, got {self.learning_rate!r}")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            _fail("warmup_steps", f"must be an int >= 0, got {self.warmup_steps!r}")
        if self.schedule != "constant":
            if (not isinstance(self.decay_steps, int) or isinstance(self.decay_steps, bool)
                    or self.decay_steps <= 0):
                _fail("decay_steps", f"must be a positive int for schedule {self.schedule!r}, got {self.decay_steps!r}")
        else:  # a decay the constant schedule would silently not apply
            if self.decay_steps is not None:
                _fail("decay_steps", f"is not used by schedule 'constant' (got {self.decay_steps!r}); choose 'linear' "
                                     "or 'cosine', or set it to None")
            if self.end_learning_rate_ratio != 0.0:
                _fail("end_learning_rate_ratio", f"is not used by schedule 'constant' (got "
                                                 f"{self.end_learning_rate_ratio!r}); choose 'linear' or 'cosine', or "
                                                 "set it to 0")
        if not 0.0 <= self.end_learning_rate_ratio <= 1.0:
            _fail("end_learning_rate_ratio", f"must be in [0, 1], got {self.end_learning_rate_ratio!r}")
        for field in ("b1", "b2"):
            if getattr(self, field) is not None and not 0.0 <= getattr(self, field) < 1.0:
                _fail(field, f"must be in [0, 1), got {getattr(self, field)!r}")
        if not self.eps >= 0:
            _fail("eps", f"must be >= 0, got {self.eps!r}")
        if not self.weight_decay >= 0:
            _fail("weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        if self.weight_decay and self.name in ("adam", "sgd"):
            _fail("weight_decay", f"is not applied by {self.name!r}; use 'adamw' (or set it to 0)")
        for field in _TUNED_FIELDS:  # a setting the chosen optimizer does not read must keep its default
            default = next(f.default for f in dataclasses.fields(self) if f.name == field)
            if field not in _READS[self.name] and getattr(self, field) != default:
                _fail(field, f"is not used by {self.name!r} (got {getattr(self, field)!r}); leave it at {default!r}")
        if self.nesterov and not self.momentum:
            _fail("nesterov", "needs momentum > 0 (with momentum=0 SGD has no momentum to look ahead with)")
        if not 0.0 <= self.momentum < 1.0:
            _fail("momentum", f"must be in [0, 1), got {self.momentum!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            _fail("max_grad_norm", f"must be > 0 or None, got {self.max_grad_norm!r}")


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
    """The learning rate as a function of the optimizer step: warm-up, then the configured decay.

    `lr(s) = peak * s / W` for `s < W`; then constant, linear or cosine from `peak` to
    `peak * end_learning_rate_ratio` over `decay_steps`.

    Args:
      config: the optimizer config.

    Returns:
      An optax schedule `step -> f32[]`.
    """
    peak = config.learning_rate
    end = peak * config.end_learning_rate_ratio
    if config.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif config.schedule == "linear":
        after = optax.linear_schedule(peak, end, config.decay_steps)
    else:
        after = optax.cosine_decay_schedule(peak, config.decay_steps, alpha=config.end_learning_rate_ratio)
    if config.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
    return optax.join_schedules([warmup, after], [config.warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay under `no_norms_or_biases`: not `scale`, not `*bias`."""

    def keep(path, _):
        key = path[-1]
        name = str(getattr(key, "key", getattr(key, "name", key)))
        return not (name == "scale" or name.endswith("bias"))

    return jax.tree_util.tree_map_with_path(keep, params)


def adafactor(learning_rate: optax.ScalarOrSchedule, *, weight_decay: float = 0.0,
              mask: Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
    """Adafactor with an absolute step size, as transformers' Trainer runs it (`optim="adafactor"`).

    Shazeer & Stern 2018, Algorithm 4 with update clipping `d = 1` and `beta2_t = 1 - t^-0.8`, but
    with `learning_rate` as the step itself (the Trainer's `Adafactor(lr, scale_parameter=False,
    relative_step=False)`; no relative step, no scaling by the parameter's RMS):

        v_t = beta2_t v_{t-1} + (1 - beta2_t) (g^2 + 1e-30)     (factored: row and column means)
        u_t = g / sqrt(v_t);   u_t <- u_t / max(1, RMS(u_t))
        p  <- p - lr_t * (u_t + weight_decay * p)

    so weight decay is decoupled and scaled by the learning rate, as in AdamW and Lion.
    `optax.adafactor(lr, weight_decay_rate=wd)` instead scales the step by `max(1e-3, RMS(p))`
    (about 50x smaller for weights of RMS 0.02) and subtracts `wd * p` every step unscaled by the
    learning rate (10% of every weight per step for 0.1). Kept from optax: a leaf's second moment
    is factored only when its two largest dimensions are both >= 128 (so a stacked layer axis of
    fewer than 128 layers is never factored), and the clipping RMS is over a whole leaf (all layers
    of a stacked one), where transformers factors every matrix and works per tensor.

    Args:
      learning_rate: the step size or schedule.
      weight_decay: the decoupled decay rate (0 = none).
      mask: the leaves that get weight decay (`decay_mask`), or None for all.

    Returns:
      The optax transform.
    """
    parts = [optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0)]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask))
    return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """The optax transform of `config`: optional global-norm clipping, then the optimizer.

    Clipping (Pascanu et al. 2013): `g <- g * min(1, max_grad_norm / ||g||_2)` over all leaves.

    Args:
      config: the optimizer config.

    Returns:
      An `optax.GradientTransformation`; the learning rate follows `make_schedule(config)`.
    """
    lr = make_schedule(config)
    mask: Callable[[Any], Any] | None = decay_mask if config.weight_decay_mask == "no_norms_or_biases" else None
    if config.name == "adamw":
        opt = optax.adamw(lr, b1=config.b1, b2=config.beta2, eps=config.eps,
                          weight_decay=config.weight_decay, mask=mask)
    elif config.name == "adam":
        opt = optax.adam(lr, b1=config.b1, b2=config.beta2, eps=config.eps)
    elif config.name == "sgd":
        opt = optax.sgd(lr, momentum=config.momentum or None, nesterov=config.nesterov)
    elif config.name == "lion":
        opt = optax.lion(lr, b1=config.b1, b2=config.beta2, weight_decay=config.weight_decay, mask=mask)
    else:
        opt = adafactor(lr, weight_decay=config.weight_decay, mask=mask)
    if config.max_grad_norm is None:
        return opt
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), opt)


def global_norm(tree: Any) -> jax.Array:
    """`sqrt(sum of squares)` over every leaf, accumulated in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
