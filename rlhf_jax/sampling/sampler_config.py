"""What a `Sampler` call samples and what the sampler reports: its config, stats and params types.

`SamplingConfig` (one call's options: the RL driver's `sampling` section), `SamplerStats` (host-side
counters), `SamplerParams` (parameters in the sampler's layout) and `default_prompt_buckets`; all are
re-exported by `rlhf_jax.sampling.sampler` and `rlhf_jax.sampling`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

from rlhf_jax.sampling.arguments import _check_int
from rlhf_jax.sampling.methods import METHOD_KINDS, Categorical, SamplingMethod

__all__ = ["SamplingConfig", "SamplerStats", "SamplerParams", "default_prompt_buckets"]

_METHODS = tuple(METHOD_KINDS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """What to sample in one call (the RL driver's `sampling` config section).

    Attributes:
      max_new_tokens: completion tokens per sample (`>= 1`); rows stop earlier at a stop id.
      method: `Greedy()`, `Categorical(temperature=...)`, `TopK`, `TopP`, `MinP` or `Filtered`
        (`make_method` maps Hugging Face-style knobs to one).
      num_samples: samples per prompt (`n`, a GRPO group); the prompt is prefilled once.
      eos_id: end-of-sequence id (a stop id), or None.
      stop_ids: further ids that end a sample (any sequence; stored as a tuple).
      min_new_tokens: no sample ends at a stop id before this many tokens (`0 <= min_new_tokens <=
        max_new_tokens`; needs a stop id): while fewer are out, the stop ids' logits are -inf before
        the method draws (Hugging Face's `min_new_tokens`, vLLM's `min_tokens`), so a completion
        that stops holds at least `min_new_tokens` tokens before its stop token. The log-probs
        reported stay the unmasked policy's, the ones the trainer recomputes (see
        `rlhf_jax.sampling.methods`). 0 (default): off, the sampler's programs unchanged.
    """

    max_new_tokens: int
    method: SamplingMethod = Categorical()
    num_samples: int = 1
    eos_id: int | None = None
    stop_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0

    def __post_init__(self):
        _check_int("SamplingConfig.max_new_tokens", self.max_new_tokens, low=1)
        _check_int("SamplingConfig.num_samples", self.num_samples, low=1)
        if not isinstance(self.method, _METHODS):
            raise TypeError(
                f"SamplingConfig.method must be one of {[m.__name__ for m in _METHODS]}, got {self.method!r}"
            )
        if self.eos_id is not None:
            _check_int("SamplingConfig.eos_id", self.eos_id, low=0)
        if isinstance(self.stop_ids, (str, bytes)) or not isinstance(self.stop_ids, Sequence):
            raise TypeError(f"SamplingConfig.stop_ids must be a sequence of ints, got {self.stop_ids!r}")
        object.__setattr__(self, "stop_ids", tuple(self.stop_ids))   # hashable: a jit static argument
        for i in self.stop_ids:
            _check_int("SamplingConfig.stop_ids[...]", i, low=0)
        check_min_new_tokens("SamplingConfig", self.min_new_tokens, self.max_new_tokens,
                             has_stops=bool(self.all_stop_ids), stops="eos_id or stop_ids")

    @property
    def all_stop_ids(self) -> tuple[int, ...]:
        """EOS and the other stop ids, sorted and without repeats."""
        ids = set(self.stop_ids) | ({self.eos_id} if self.eos_id is not None else set())
        return tuple(sorted(ids))


def check_min_new_tokens(owner: str, value, max_new_tokens: int, *, has_stops: bool, stops: str) -> None:
    """ValueError naming `owner.min_new_tokens` unless it is an int in `[0, max_new_tokens]`, and > 0
    only with something to suppress (`stops` names the fields that give the stop ids)."""
    _check_int(f"{owner}.min_new_tokens", value, low=0)
    if value > max_new_tokens:
        raise ValueError(f"{owner}.min_new_tokens={value} exceeds {owner}.max_new_tokens={max_new_tokens} "
                         "(no completion can hold more than max_new_tokens tokens)")
    if value and not has_stops:
        raise ValueError(f"{owner}.min_new_tokens={value} has no effect without {stops}: nothing would stop a "
                         f"sample early; set {stops}, or leave min_new_tokens at 0")


@dataclasses.dataclass
class SamplerStats:
    """Counters of a `Sampler` (host side): calls of each program and the last hand-off time."""

    prefill_calls: int = 0
    decode_calls: int = 0
    handoffs: int = 0
    handoff_seconds: float | None = None
    handoff_path: str | None = None  # "program", "program+copy" (other devices) or "host" (see load_params)


class SamplerParams(NamedTuple):
    """Parameters already in the sampler's layout (dtype, shardings, per-layer split): `load_params`."""

    tree: dict


def default_prompt_buckets(max_len: int, *, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` below `max_len`, then `max_len`: at most ~log2(max_len) shapes."""
    _check_int("default_prompt_buckets max_len", max_len, low=2)
    buckets, size = [], smallest
    while size < max_len:
        buckets.append(size)
        size *= 2
    return tuple(buckets) + (max_len,)
