"""One-step off-policy RL: rollouts of the next step drawn with the current weights while they update.

    --set off_policy.enabled=true --set off_policy.sampler_devices=4 --set algorithm.tis_cap=2.0

On-policy (the default) a step hands the weights to the sampler, samples, then updates, so sampler
and trainer wait for each other. With `off_policy.enabled` step t trains on rollouts sampled with
the weights of step t-1 (drawn during step t-1's update) and, while its own update runs on the
trainer's devices, samples the rollouts of step t+1 with the weights it started from, on the
sampler's devices (`sampler_devices`: the last devices hold the sampler alone; JAX dispatches the
update asynchronously, so the two run at once). The loss corrects the lag with truncated importance
weights against the sampler's log-probs (`algorithm.tis_cap`,
`rlhf_jax.steps.policy_gradient.truncated_importance_weights`, as verl's TIS); how many updates
separate a batch's sampling weights from the weights it updates (`policy_staleness`) is bounded
by `max_staleness` and logged as `off_policy/staleness`.

The prompt batches keep their order: the trainer reads one batch ahead (`Lookahead`), and a
checkpoint stores the data position of the first batch not yet trained on, so a resumed run samples
the batches it had drawn ahead again (on-policy for its first step: the rollouts in flight are not
saved).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax

from rlhf_jax.config import ConfigError
from rlhf_jax.sharding import MeshConfig

__all__ = ["OffPolicyConfig", "policy_staleness", "Lookahead", "split_devices"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffPolicyConfig:
    """Where the sampler runs and whether rollouts may lag the trainer (the `off_policy` section).

    Attributes:
      enabled: one-step off-policy RL (needs `algorithm.tis_cap`); False = on-policy, unchanged.
      max_staleness: updates between the weights that sampled a batch and the weights it updates,
        at most (>= 1; the one-step pipeline keeps one batch in flight, so its batches lag by <= 1).
      sampler_devices: the last `sampler_devices` devices run the sampler alone and the trainer's
        mesh takes the others (0 = the sampler shares the trainer's devices). Works on-policy too.
      sampler_mesh: the sampler's mesh shape and strategy on its devices (e.g. `tensor=-1,
        strategy="tp"`); None = the run's `mesh` section laid over them.
    """

    enabled: bool = False
    max_staleness: int = 1
    sampler_devices: int = 0
    sampler_mesh: MeshConfig | None = None

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"off_policy.enabled must be a bool, got {self.enabled!r}")
        for name, low in (("max_staleness", 1), ("sampler_devices", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"off_policy.{name} must be an int >= {low}, got {value!r}")
        if self.sampler_mesh is not None and not isinstance(self.sampler_mesh, MeshConfig):
            raise ConfigError(f"off_policy.sampler_mesh must be a MeshConfig (e.g. MeshConfig(data=1, tensor=-1, "
                              f"strategy='tp')) or None, got {type(self.sampler_mesh).__name__} {self.sampler_mesh!r}")


def check_devices(config) -> None:
    """`sampler_devices` leaves the trainer at least one device (checked when a run starts)."""
    split_devices(config)


def check_off_policy(config) -> None:
    """What an RL config with an `off_policy` section must also have (ConfigError when it is built)."""
    off = config.off_policy
    if not off.enabled:
        return
    if config.algorithm.tis_cap is None:
        raise ConfigError("off_policy.enabled needs algorithm.tis_cap (truncated importance weights against the "
                          "sampler's log-probs; verl uses 2.0): --set algorithm.tis_cap=2.0")
    if config.rollout.dynamic_sampling:
        raise ConfigError("off_policy.enabled does not combine with rollout.dynamic_sampling (its extra prompt "
                          "batches would be drawn from the batches read ahead)")


def split_devices(config, devices: list | None = None) -> tuple[list | None, list | None]:
    """`(trainer devices, sampler devices)` of `devices` (default `jax.devices()`; `rlhf-jax compile`
    gives a target's): the sampler takes the last `off_policy.sampler_devices`. `(None, None)` when
    they share all devices.

    Raises:
      ConfigError: `sampler_devices` leaves the trainer no device.
    """
    k = config.off_policy.sampler_devices
    if not k:
        return None, None
    devices = list(jax.devices() if devices is None else devices)
    if k >= len(devices):
        raise ConfigError(f"off_policy.sampler_devices={k} leaves no device for the trainer ({len(devices)} devices)")
    return devices[: len(devices) - k], devices[len(devices) - k:]


def policy_staleness(update_version: int, sample_version: int, *, max_staleness: int) -> int:
    """Updates between the weights that sampled a batch and the weights about to update on it.

        staleness = update_version - sample_version,   0 <= staleness <= max_staleness

    A version counts the optimizer steps applied to the weights (the initial weights are 0). On-policy
    the staleness is 0; one-step off-policy, 1 from the second step on (step t trains the weights
    of version t-1 on rollouts of version t-2).

    Raises:
      ValueError: a batch sampled by weights newer than the trainer's, or older than the bound.
    """
    staleness = update_version - sample_version
    if staleness < 0:
        raise ValueError(f"off-policy: rollouts of policy version {sample_version} are newer than the trainer's "
                         f"version {update_version}")
    if staleness > max_staleness:
        raise ValueError(f"off-policy: rollouts of policy version {sample_version} are {staleness} updates behind "
                         f"the trainer's version {update_version}, more than off_policy.max_staleness={max_staleness}")
    return staleness


class Lookahead(Iterator):
    """A batch iterator that can be read ahead without losing its checkpoint position.

    `peek(i)` is the batch `i` places after the next one; `get_state()` is the wrapped iterator's
    state before the first batch read ahead and not yet returned by `next`.
    """

    def __init__(self, batches):
        self.batches = batches
        self._ahead: collections.deque = collections.deque()  # (state before the batch, batch)

    def __next__(self):
        if self._ahead:
            return self._ahead.popleft()[1]
        return next(self.batches)

    def peek(self, i: int = 0):
        """The batch `i` places ahead (None when the data ends first)."""
        while len(self._ahead) <= i:
            state = copy.deepcopy(self.batches.get_state())
            try:
                batch = next(self.batches)
            except StopIteration:
                return None
            self._ahead.append((state, batch))
        return self._ahead[i][1]

    def get_state(self) -> Any:
        return self._ahead[0][0] if self._ahead else self.batches.get_state()

    def set_state(self, state) -> None:
        self._ahead.clear()
        self.batches.set_state(state)
