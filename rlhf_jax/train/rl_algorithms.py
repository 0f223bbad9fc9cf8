"""The two online-RL algorithms as objects: how each builds its models, state and update step.

Both keep an `RLState` (policy `TrainState`, frozen reference, critic, KL controller): `GRPO` has
no critic and no controller; `PPO` has a critic (a separate scalar-head model with its own
optimizer, or a value head on the policy's backbone) and a KL controller. Each object is the
`StateSpec` of its state (abstract shapes, shardings, fresh init, checkpoint items) and knows its
pure update (`steps.make_grpo_step` / `steps.make_ppo_step`) and how completions are grouped.

With `config.lora` the policy (and a separate critic) is a `LoraLM`: only adapters (and value or
score heads) train, and the reference is the policy's own base with adapters off, so the state
holds no reference copy (`RLState.reference` is None; `reference_params` reads the base).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import sharding as sh
from rlhf_jax.config import ConfigError
from rlhf_jax.models import CausalLM
from rlhf_jax.models.heads import SCALAR_HEAD_AXES, init_scalar_head
from rlhf_jax.optim import make_optimizer, make_schedule
from rlhf_jax.state import (
    RLState,
    TrainState,
    abstract_train_state,
    place_params,
    rl_state_shardings,
    train_state_from_params,
)
from rlhf_jax.steps import make_grpo_step, make_ppo_step
from rlhf_jax.models.lora import base_params
from rlhf_jax.train.adapters import (
    check_mergeable,
    lora_of,
    make_model,
    params_from_items,
    params_items,
    plain_model,
    plain_params,
    reference_model,
)
from rlhf_jax.train.weights import starting_params

__all__ = ["RLAlgorithm", "GRPO", "PPO"]


def _copy(tree):
    """Fresh device buffers (the reference must not alias the donated policy state)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


class RLAlgorithm(abc.ABC):
    """What GRPO and PPO share: the policy (and reference) state; subclasses add critic and controller.

    Attributes:
      config: the run config (`GRPORunConfig` / `PPORunConfig`).
      policy: the policy `CausalLM`.
      group_size: completions sampled per prompt.
      reference_group: rows per shared prompt forward in the reference pass (1 = none).
    """

    shared_value_head = False  # the value head lives in the policy's params (PPO option)

    def __init__(self, config, mesh: Mesh):
        self.config, self.mesh, self.strategy = config, mesh, config.mesh.strategy
        check_mergeable(config)
        self.policy = make_model(config)
        self.policy_tx = make_optimizer(config.optim)
        self.value: CausalLM | None = None
        self.value_tx: optax.GradientTransformation | None = None
        self.group_size = 1
        self.reference_group = 1

    # ------------------------------------------------------------------------ policy parameters
    @property
    def policy_axes(self):
        return ({"lm": self.policy.logical_axes, "value_head": SCALAR_HEAD_AXES} if self.shared_value_head
                else self.policy.logical_axes)

    def lm_params(self, policy_params):
        """The language model's parameters inside the policy's (without a shared value head)."""
        return policy_params["lm"] if self.shared_value_head else policy_params

    @property
    def reference_model(self):
        """The model that runs `reference_params` (a LoRA policy's base; QLoRA's dequantizes inside)."""
        return reference_model(self.policy)

    @property
    def sampling_model(self) -> CausalLM:
        """The plain model the sampler and the reference pass run (a LoRA policy's base)."""
        return plain_model(self.policy)

    def sampling_params(self, policy_params):
        """The policy as plain `CausalLM` parameters for the sampler (LoRA: adapters merged)."""
        return plain_params(self.policy, self.lm_params(policy_params))

    def reference_params(self, state: RLState):
        """The reference policy's parameters: the state's reference, or a LoRA policy's base (no copy)."""
        if lora_of(self.policy) is None or not self.config.algorithm.uses_reference:
            return state.reference
        return base_params(self.lm_params(state.policy.params))

    def _policy_init(self, key):
        lm = self.policy.init(key)
        return {"lm": lm, "value_head": init_scalar_head(self.config.model, key)} if self.shared_value_head else lm

    def _initial_lm(self, rng):
        """The policy's starting weights, each array created (or read) directly in its sharding."""
        place = dict(mesh=self.mesh, strategy=self.strategy)
        if self.config.checkpoint.init_from:
            return starting_params(self.policy, self.config.checkpoint.init_from, rng=rng, **place)
        shardings = sh.param_shardings(self.policy.abstract_params(), self.policy.logical_axes, **place)
        return jax.jit(self.policy.init, out_shardings=shardings)(jax.random.fold_in(rng, 0))

    @property
    def _keeps_reference(self) -> bool:
        """Whether the state holds a reference copy (a KL term, and not LoRA's base)."""
        return self.config.algorithm.uses_reference and lora_of(self.policy) is None

    # ------------------------------------------------------------------------- the state spec
    def abstract(self) -> RLState:
        policy = abstract_train_state(self._policy_init, self.policy_tx)
        reference = self.policy.abstract_params() if self._keeps_reference else None
        value = abstract_train_state(self.value.init, self.value_tx) if self.value is not None else None
        return RLState(policy, reference, value, self._abstract_kl())

    def shardings(self) -> RLState:
        return rl_state_shardings(self.abstract(), policy_axes=self.policy_axes,
                                  reference_axes=self.policy.logical_axes,
                                  value_axes=None if self.value is None else self.value.logical_axes,
                                  policy_optimizer=self.policy_tx, value_optimizer=self.value_tx,
                                  mesh=self.mesh, strategy=self.strategy)

    def fresh(self) -> RLState:
        rng = jax.random.key(self.config.seed)
        lm = self._initial_lm(rng)
        params = {"lm": lm, "value_head": init_scalar_head(self.config.model, jax.random.fold_in(rng, 1))} \
            if self.shared_value_head else lm
        place = dict(mesh=self.mesh, strategy=self.strategy)
        policy = train_state_from_params(_copy(params), self.policy_tx, rng=self.config.seed,
                                         logical_axes=self.policy_axes, **place)
        reference = None
        if self._keeps_reference:
            reference = place_params(_copy(lm), self.policy.logical_axes, **place)
        return RLState(policy, reference, self._fresh_value(lm, rng), self._fresh_kl())

    def save_items(self, state: RLState) -> dict[str, Any]:
        """Checkpoint items; `params` is the policy's language model alone (exportable as is)."""
        p = state.policy
        items = {**params_items(self.policy, self.lm_params(p.params)),
                 "train": {"step": p.step, "opt_state": p.opt_state, "rng": p.rng}}
        if self.shared_value_head:
            items["value_head"] = p.params["value_head"]
        if state.reference is not None:
            items["reference"] = state.reference
        if state.value is not None:
            v = state.value
            items["value"] = {"params": v.params, "step": v.step, "opt_state": v.opt_state, "rng": v.rng}
        if state.kl is not None:
            items["kl"] = state.kl
        return items

    def from_items(self, items: Mapping[str, Any]) -> RLState:
        train = items["train"]
        lm = params_from_items(self.policy, items)
        params = {"lm": lm, "value_head": items["value_head"]} if self.shared_value_head else lm
        value = None
        if "value" in items:
            v = items["value"]
            value = TrainState(v["step"], v["params"], v["opt_state"], v["rng"])
        return RLState(TrainState(train["step"], params, train["opt_state"], train["rng"]), items.get("reference"),
                       value, items.get("kl"))

    # ------------------------------------------------------------------- what subclasses add
    def _abstract_kl(self):
        return None

    def _fresh_kl(self):
        return None

    def _fresh_value(self, lm, rng) -> TrainState | None:
        del lm, rng
        return None

    @abc.abstractmethod
    def update(self) -> Callable:
        """The pure `step(state, batch) -> (state, metrics)` of the algorithm."""


class GRPO(RLAlgorithm):
    """The GRPO family (any `GRPO_PRESETS` configuration): policy and reference, no critic."""

    def __init__(self, config, mesh: Mesh):
        super().__init__(config, mesh)
        algorithm = config.algorithm
        self.group_size = algorithm.group_size
        self.reference_group = algorithm.group_size if algorithm.share_prompt else 1

    def update(self) -> Callable:
        return make_grpo_step(self.policy, self.policy_tx, config=self.config.algorithm,
                              nonfinite=self.config.train.nonfinite, learning_rate=make_schedule(self.config.optim))


class PPO(RLAlgorithm):
    """PPO with a learned critic and a KL controller (InstructGPT-style RLHF).

    The critic is a separate scalar-head model with its own optimizer (`value.optim`), started
    from the reward model (`value.init="reward_model"`) or the policy's backbone; or, with
    `value.shared_backbone`, a value head on the policy's backbone trained by the policy's optimizer.
    """

    def __init__(self, config, mesh: Mesh):
        algorithm = config.algorithm
        if algorithm.kl_target is not None and config.data.batch_size > algorithm.kl_horizon:
            # Each step updates beta with n = data.batch_size (one completion per prompt); the controller
            # refuses n > horizon, and would only say so inside the first update's trace.
            raise ConfigError(f"algorithm.kl_horizon {algorithm.kl_horizon} is smaller than data.batch_size "
                              f"{config.data.batch_size}, the samples each step's adaptive KL update counts "
                              "(beta would move by more than 20% per step): raise algorithm.kl_horizon")
        self.shared_value_head = config.value.shared_backbone
        super().__init__(config, mesh)
        if not self.shared_value_head:
            self.value = make_model(config, head="scalar")  # with lora: adapters and the score head train
            self.value_tx = make_optimizer(config.value.optim)

    def _abstract_kl(self):
        return jax.eval_shape(self.config.algorithm.kl_controller().init)

    def from_items(self, items: Mapping[str, Any]) -> RLState:
        state = super().from_items(items)
        if self.config.algorithm.kl_target is None:
            # A fixed beta is the config's, not the run's state: a resume with a new algorithm.kl_coef
            # trains with it (the checkpoint's would be used silently). An adaptive beta resumes.
            state = state._replace(kl=self._fresh_kl())
        return state

    def _fresh_kl(self):
        # Replicated on the mesh, as the step's state shardings have it: an uncommitted scalar
        # here made the update's second call (its first with a returned state) compile it again.
        return jax.device_put(self.config.algorithm.kl_controller().init(), sh.replicated(self.mesh))

    def _fresh_value(self, lm, rng) -> TrainState | None:
        if self.value is None:
            return None
        config = self.config
        if config.value.init == "reward_model":
            vparams = starting_params(self.value, config.rewards.reward_model, rng=rng, mesh=self.mesh,
                                      strategy=self.strategy, key="rewards.reward_model (value.init='reward_model')",
                                      reward_model=True)
        elif config.checkpoint.init_from:
            vparams = starting_params(self.value, config.checkpoint.init_from, rng=rng, mesh=self.mesh,
                                      strategy=self.strategy)
        else:
            backbone = lm if lora_of(self.policy) is None else base_params(lm)
            vparams = {k: v for k, v in backbone.items() if k != "lm_head"}
            vparams["score"] = init_scalar_head(config.model, jax.random.fold_in(rng, 2))
            if lora_of(self.value) is not None:
                vparams = self.value.init_from_base(vparams, jax.random.fold_in(rng, 3))
        return train_state_from_params(_copy(vparams), self.value_tx, rng=config.seed + 1,
                                       logical_axes=self.value.logical_axes, mesh=self.mesh, strategy=self.strategy)

    def update(self) -> Callable:
        return make_ppo_step(self.policy, self.policy_tx, config=self.config.algorithm, value_model=self.value,
                             value_optimizer=self.value_tx, nonfinite=self.config.train.nonfinite,
                             learning_rate=make_schedule(self.config.optim))

