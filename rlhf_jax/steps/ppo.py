"""PPO with a learned critic (InstructGPT-style RLHF), from the pure core.

    r_t         = per_token_rewards(scores, m, kl=logp_old - logp_ref, kl_coef=beta)   # KL in reward
    A, R        = gae(r, V_old, m, gamma, lam); A whitened over the batch
    loss        = ppo_objective(logps, logp_old, A, m, values=V, old_values=V_old, returns=R, ...)
    beta       <- kl_controller.update(beta, mean_b sum_t (logp_old - logp_ref), N)

`ppo_objective` is the whole minibatch loss as one pure function of arrays; `make_ppo_step` computes
its inputs (forward passes, rewards, GAE) and runs it over epochs and minibatches
(`rlhf_jax.steps.policy_gradient`).

The critic is a separate scalar-head model with its own `TrainState` in `state.value`, or a
`value_head` on the policy's backbone: the policy's params are then `{"lm": <CausalLM params>,
"value_head": f32[E]}` and the value loss joins the policy's objective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import _checks
from rlhf_jax.advantages import gae, per_token_rewards, whiten
from rlhf_jax.config import check_unused
from rlhf_jax.kl_control import KLController, adaptive_kl_controller, fixed_kl_controller
from rlhf_jax.losses import aggregate, kl_divergence, value_loss
from rlhf_jax.models.heads import scalar_head
from rlhf_jax.models.lora import head_needs_logits
from rlhf_jax.rollout import completion_logprobs_and_hidden, completion_values, head_logprobs, logits_logprobs
from rlhf_jax.state import RLState
from rlhf_jax.steps.common import NonFinitePolicy, accumulate_gradients, apply_gradients, step_key
from rlhf_jax.steps.policy_gradient import (
    PolicyGradientConfig,
    aggregate_loss,
    check_nonnegative,
    check_rl_batch,
    fail,
    micro_batch_metrics,
    normalisers,
    old_logprobs_source,
    policy_loss_terms,
    reduce_update_metrics,
    reference_and_entropy_terms,
    rollout_host_check,
    rollout_logprobs,
    rollout_stats,
    run_updates,
    sampler_diff,
)

__all__ = ["PPOConfig", "ppo_objective", "ppo_value_objective", "ppo_token_rewards", "make_ppo_step"]

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig(PolicyGradientConfig):
    """The objective of PPO with a learned critic (InstructGPT-style RLHF).

    The shared fields (trust region, KL, entropy, epochs, minibatches, ...) are those of
    `PolicyGradientConfig`, whose defaults are PPO's: k1 KL in the per-token reward
    (`kl_mode="reward"`, `kl_coef=0.05`; another `kl_estimator` replaces k1 there, as TRL's does),
    `token_mean` aggregation, 4 epochs. The adaptive controller and `kl/rollout_sequence` always
    read the summed k1, the sequence KL of Ziegler et al.

    Attributes:
      gamma, lam: GAE's discount and lambda.
      value_clip: clip range of the value loss around the rollout's values (None = unclipped).
      vf_coef: weight of the value loss (in the shared objective of a value head on the policy's
        backbone; it scales the separate critic's loss otherwise).
      kl_target: set, it makes `kl_coef` (the initial `beta`) adaptive (Ziegler et al. 2019) with
        `kl_horizon` (which, set to another value without `kl_target`, is refused).
      whiten_rewards: rescale the per-token rewards (KL included) to unit variance over the batch
        before GAE, keeping their mean (`whiten(r, m, shift_mean=False)`; TRL's `whiten_rewards`, with
        the population variance).
      whiten_advantages: normalise the advantages over the batch.
      ptx_coef: weight of the pretraining-data language-modelling loss (PPO-ptx; 0 = off).
    """

    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float | None = 0.2
    vf_coef: float = 0.1
    kl_target: float | None = None
    kl_horizon: float = 10_000.0
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    ptx_coef: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        for field in ("gamma", "lam"):
            if not 0 <= getattr(self, field) <= 1:
                fail(field, f"must be in [0, 1], got {getattr(self, field)!r}")
        if self.value_clip is not None and not self.value_clip > 0:
            fail("value_clip", f"must be > 0 or None, got {self.value_clip!r}")
        check_nonnegative("vf_coef", self.vf_coef)
        check_nonnegative("ptx_coef", self.ptx_coef)
        if self.kl_target is not None:
            if not self.kl_target > 0:
                fail("kl_target", f"must be > 0 or None, got {self.kl_target!r}")
            if not self.kl_coef > 0:
                fail("kl_coef", "must be > 0 for an adaptive controller (kl_target is set)")
            if self.kl_mode == "none":
                fail("kl_target", f"is {self.kl_target}, which adapts a KL penalty, but kl_mode='none' has none: "
                     "set kl_mode 'reward' or 'loss', or kl_target None")
        if not self.kl_horizon > 0:
            fail("kl_horizon", f"must be > 0, got {self.kl_horizon!r}")
        check_unused("algorithm", self, "kl_horizon", used=self.kl_target is not None,
                     needs="algorithm.kl_target is set (the adaptive KL controller)")

    def kl_controller(self) -> KLController:
        """The KL-coefficient controller: adaptive when `kl_target` is set, else fixed."""
        if self.kl_target is None:
            return fixed_kl_controller(kl_coef=self.kl_coef)
        return adaptive_kl_controller(init_kl_coef=self.kl_coef, target=self.kl_target, horizon=self.kl_horizon)


# ----------------------------------------------------------------------------------- pure objective


def ppo_value_objective(values, old_values, returns, mask, *, config: PPOConfig, num_tokens=None,
                        num_sequences=None) -> tuple[jax.Array, Metrics]:
    """The critic's weighted loss `vf_coef * aggregate(value_loss(V, V_old, R, m, clip_range=value_clip))`.

    Returns:
      `(loss, metrics)`: metrics `value_loss` (before `vf_coef`) and, with `value_clip`,
      `value_clipfrac`: the fraction of tokens whose clipped squared error is the larger one, so
      the clipped branch sets the loss (and the gradient is 0), as TRL's `val/clipfrac` and verl's
      `critic/vf_clipfrac` (`(V_clip - R)^2 > (V - R)^2`); a `V` outside the clip range on the side
      of `R` that improves the fit keeps its gradient and does not count.
    """
    for name, x in (("old_values", old_values), ("returns", returns)):
        if x is None:
            raise ValueError(f"ppo_value_objective: {name} is None; the value loss needs values, old_values and "
                             "returns")
    per_token = value_loss(values, old_values, returns, mask, clip_range=config.value_clip)
    vl = aggregate_loss(per_token, mask, mode=config.loss_aggregation, num_tokens=num_tokens,
                        num_sequences=num_sequences)
    metrics = {"value_loss": vl}
    if config.value_clip is not None:
        v, old, ret = (jax.lax.stop_gradient(_checks.f32(x)) for x in (values, old_values, returns))
        clipped_v = old + jnp.clip(v - old, -config.value_clip, config.value_clip)
        # Inside the range the clipped value is V itself: comparing the two errors there would count
        # the rounding of `old + (V - old)` (about half the tokens of a first update, V == V_old).
        outside = jnp.abs(v - old) > config.value_clip
        clipped = outside & (jnp.square(clipped_v - ret) > jnp.square(v - ret))
        metrics["value_clipfrac"] = _checks.masked_mean(clipped.astype(jnp.float32), mask)
    return config.vf_coef * vl, metrics


def ppo_objective(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    config: PPOConfig,
    values: jax.Array | None = None,
    old_values: jax.Array | None = None,
    returns: jax.Array | None = None,
    ref_logps: jax.Array | None = None,
    entropy: jax.Array | None = None,
    kl_coef: jax.Array | float | None = None,
    ptx_logps: jax.Array | None = None,
    ptx_mask: jax.Array | None = None,
    num_ptx_tokens: jax.Array | None = None,
    num_tokens: jax.Array | None = None,
    num_sequences: jax.Array | None = None,
    sampler_logps: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """PPO's scalar loss on one minibatch, from per-token arrays.

    With ratio `rho_t = exp(logp_t - logp_old,t)` and `agg` = `aggregate` in `loss_aggregation`:

        L_pi  = agg( -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A)      policy clip (dual-clipped)
                     [+ beta k(logp, logp_ref)]   (kl_mode == "loss")    KL in the loss
                     [- c_H H] )                                          entropy bonus
        L_V   = vf_coef * agg( 1/2 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) )
        L_ptx = ptx_coef * ( -sum(m' log pi(x')) / N' )                   LM loss on pretraining data
        L     = L_pi [+ L_V] [+ L_ptx]

    `L_V` joins when `values` are given (a value head on the policy's backbone; a separate critic
    takes `ppo_value_objective` alone), `L_ptx` when `ptx_logps` are.

    Args:
      logps: `[N, C]` current log-probs (differentiated).
      old_logps: `[N, C]` the rollout policy's log-probs.
      advantages: `[N, C]` (GAE, whitened).
      mask: `[N, C]` completion mask.
      config: the `PPOConfig` (clip ranges, coefficients, aggregation).
      values, old_values, returns: `[N, C]` current and rollout values and GAE returns, or None.
      ref_logps: `[N, C]` reference log-probs (the in-loss KL and the `kl` metrics), or None.
      entropy: `[N, C]` per-token entropies (the bonus and the `entropy` metric), or None.
      kl_coef: `beta` of the in-loss KL (e.g. the KL controller's); default `config.kl_coef`.
      ptx_logps, ptx_mask: `[M, L]` log-probs of pretraining targets and their mask, or None.
      num_ptx_tokens: `N'`, the pretraining targets of the whole minibatch (default: of `ptx_mask`).
      num_tokens, num_sequences: global normalisers for micro-batches (see `aggregate`).
      sampler_logps: `[N, C]` the sampler's log-probs; with `config.tis_cap` the policy term's tokens
        are weighted by `policy_gradient.truncated_importance_weights` (metrics `tis/*`).

    Returns:
      `(loss, metrics)`: metrics `loss/policy` (`L_pi` without the KL and entropy terms), the
      clip fractions and `approx_kl` of `ppo_policy_loss`, `kl`, `kl/sequence`, `entropy` (as in
      `grpo_objective`), `value_loss`, `value_clipfrac` (with values) and `loss/ptx` (with ptx).

    References: Schulman et al. 2017 (PPO, clipped value loss as in OpenAI baselines); Ziegler et
    al. 2019; Ouyang et al. 2022 (InstructGPT, PPO-ptx); Huang et al. 2024, "The N+ Implementation
    Details of RLHF with PPO".
    """
    if ptx_logps is not None and ptx_mask is None:
        raise ValueError("ppo_objective: ptx_logps needs its ptx_mask (the language-modelling targets)")
    norm = dict(num_tokens=num_tokens, num_sequences=num_sequences)
    per_token, metrics = policy_loss_terms("ppo", config, logps, old_logps, advantages, mask,
                                           sampler_logps=sampler_logps)
    metrics = dict(metrics)
    metrics["loss/policy"] = aggregate_loss(per_token, mask, mode=config.loss_aggregation, **norm)
    per_token = per_token + reference_and_entropy_terms(config, logps, ref_logps, entropy, mask, metrics,
                                                        kl_coef=kl_coef)
    loss = aggregate_loss(per_token, mask, mode=config.loss_aggregation, **norm)
    if values is not None:
        value_part, value_metrics = ppo_value_objective(values, old_values, returns, mask, config=config, **norm)
        loss = loss + value_part
        metrics.update(value_metrics)
    if ptx_logps is not None:
        lm_loss = -aggregate(ptx_logps, ptx_mask, mode="token_mean", num_tokens=num_ptx_tokens)
        metrics["loss/ptx"] = lm_loss
        loss = loss + config.ptx_coef * lm_loss
    return loss, metrics


# ------------------------------------------------------------------------------------------ the step


def _explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """`1 - Var[R - V] / Var[R]` over the masked tokens (0 when the returns have no variance)."""
    var_r = _checks.masked_mean(jnp.square(returns - _checks.masked_mean(returns, mask)), mask)
    resid = returns - values
    var_e = _checks.masked_mean(jnp.square(resid - _checks.masked_mean(resid, mask)), mask)
    return jnp.where(var_r > 0, 1.0 - var_e / jnp.where(var_r > 0, var_r, 1.0), 0.0)


def ppo_token_rewards(scores: jax.Array, mask: jax.Array, *, token_rewards: jax.Array | None = None,
                      kl: jax.Array | None = None, kl_coef: float | jax.Array = 0.0) -> jax.Array:
    """PPO's per-token reward `r_t`: the score at the last action token, or rewards the rollout placed.

    `r_t = R_t m_t - beta KL_t m_t`, with `R_t = [t = last valid token] score` (single turn:
    `advantages.per_token_rewards`) or `R = token_rewards` (multi-turn: each turn's reward at that
    turn's last action token, `rlhf_jax.agents.turn_token_rewards`). Observation tokens between turns
    have `m_t = 0`: no reward, no KL, and `advantages.gae` skips them (the recursion runs over action
    tokens only, the value of the next action bootstrapping across an observation).

    Args:
      scores: `[B]` sequence rewards (used when `token_rewards` is None).
      mask: `[B, T]` action mask.
      token_rewards: `[B, T]` per-token rewards, or None.
      kl: `[B, T]` per-token KL estimates, or None.
      kl_coef: `beta >= 0`.

    Returns:
      float32 `[B, T]`. Reference: Ziegler et al. 2019; Ouyang et al. 2022 (InstructGPT).

    Example:
      >>> mask = jnp.array([[1, 1, 0, 1]])                   # action, action, observation, action
      >>> ppo_token_rewards(jnp.array([1.5]), mask, token_rewards=jnp.array([[0.0, 0.5, 0.0, 1.0]])).tolist()
      [[0.0, 0.5, 0.0, 1.0]]
    """
    if token_rewards is None:
        return per_token_rewards(scores, mask, kl=kl, kl_coef=kl_coef)
    _checks.check_same_shape("ppo_token_rewards", token_rewards=token_rewards, mask=mask)
    placed = _checks.apply_mask(_checks.f32(token_rewards), _checks.mask_f32(mask))
    return placed + per_token_rewards(jnp.zeros_like(_checks.f32(scores)), mask, kl=kl, kl_coef=kl_coef)


def make_ppo_step(
    policy_model,
    policy_optimizer: optax.GradientTransformation,
    *,
    config: PPOConfig,
    value_model=None,
    value_optimizer: optax.GradientTransformation | None = None,
    nonfinite: NonFinitePolicy = "skip",
    learning_rate: optax.Schedule | None = None,
) -> Callable[[RLState, dict], tuple[RLState, Metrics]]:
    """PPO's update: rollout values, KL-shaped token rewards, GAE, then epochs x minibatches of
    `ppo_objective` updates of the policy (and of the critic), then the KL controller.

    1. `V_old` (critic) and, when needed, `logp_old` by a forward pass before any update;
    2. `r_t = per_token_rewards(scores, m, kl=k(logp_old, logp_ref), kl_coef=beta)` (KL in reward; `k` the
       configured estimator, k1 `logp_old - logp_ref` by default), or
       with the batch's `token_rewards` (multi-turn) those in place of the score (`ppo_token_rewards`);
       with `whiten_rewards`, `r <- whiten(r, m, shift_mean=False)`;
    3. `A, R = gae(r, V_old, m, gamma, lam)`, `A` whitened over the batch;
    4. per minibatch: `ppo_objective` (with the value term for a value head on the policy's
       backbone) and, for a separate critic, `ppo_value_objective` with its own optimizer;
    5. `beta <- controller.update(beta, mean_b sum_t (logp_old - logp_ref), N)`.

    Args:
      policy_model: the policy `CausalLM` (LM head).
      policy_optimizer: its optax transform (for the shared backbone, of the whole
        `{"lm", "value_head"}` tree).
      config: a `PPOConfig`.
      value_model: the critic, a `CausalLM(..., head="scalar")` with its own `TrainState` in
        `state.value`; None = a value head on the policy's backbone (`state.value` is None).
      value_optimizer: the critic's optax transform (required with `value_model`).
      nonfinite: the NaN/Inf guard of each update.
      learning_rate: the policy's schedule, reported as `learning_rate`.

    Returns:
      The pure `step(state, batch) -> (state, metrics)`; jit it with `steps.common.jit_step`.
      Metrics: those of `make_grpo_step` plus `value_loss`, `value_clipfrac`,
      `explained_variance`, `values/mean`, `returns/mean`, `kl_coef`, `loss/ptx` (with PPO-ptx),
      `value/grad_norm` (separate critic).

    References: see `ppo_objective`.
    """
    if not isinstance(config, PPOConfig):
        raise TypeError(f"make_ppo_step: config must be a PPOConfig, got {type(config).__name__}")
    shared = value_model is None
    if not shared and value_optimizer is None:
        raise ValueError("make_ppo_step: a separate value_model needs a value_optimizer")
    if not shared and getattr(value_model, "head", None) != "scalar":
        raise ValueError("make_ppo_step: value_model must be a scalar-head model (CausalLM(config, head='scalar'), "
                         f"e.g. the reward model's), got head={getattr(value_model, 'head', None)!r}")
    controller = config.kl_controller()
    old_source = old_logprobs_source(config)
    if shared and old_source == "current":
        old_source = "recompute"  # the values' forward pass gives the log-probs for free

    def lm_params(params):
        return params["lm"] if shared else params

    def policy_forward(params, mb, *, with_entropy: bool, rng=None):
        """Log-probs, entropies and (shared backbone) values of a minibatch from one forward pass."""
        logps, entropy, hidden = completion_logprobs_and_hidden(
            policy_model, lm_params(params), mb["prompt_tokens"], mb["prompt_lengths"], mb["completion_tokens"],
            temperature=config.temperature, with_entropy=with_entropy, chunk_size=config.chunk_size, rng=rng)
        values = scalar_head(params["value_head"], hidden) if shared else None
        return logps, entropy, values

    def critic(vparams, mb, rng=None):
        return completion_values(value_model, vparams, mb["prompt_tokens"], mb["prompt_lengths"],
                                 mb["completion_tokens"], rng=rng)

    def ptx_logps(params, tokens, rng):
        out = policy_model.forward(lm_params(params), tokens[:, :-1], rng=rng)
        if head_needs_logits(policy_model, rng):
            return logits_logprobs(out.logits, tokens[:, 1:])[0]
        logps, _ = head_logprobs(out.hidden, policy_model.lm_head_weight(lm_params(params)), tokens[:, 1:],
                                 chunk_size=config.chunk_size)
        return logps

    def policy_loss_fn(params, mb, context, rng):
        mask = mb["completion_mask"]
        logps, entropy, values = policy_forward(params, mb, with_entropy=True, rng=rng)
        value_args = dict(values=values, old_values=mb["old_values"], returns=mb["returns"]) if shared else {}
        ptx_args = {}
        if "ptx_tokens" in mb and config.ptx_coef > 0:
            ptx_args = dict(ptx_logps=ptx_logps(params, mb["ptx_tokens"], jax.random.fold_in(rng, 2)),
                            ptx_mask=mb["ptx_mask"][:, 1:],
                            num_ptx_tokens=context["ptx_tokens"])
        loss, metrics = ppo_objective(
            logps, jax.lax.stop_gradient(logps) if old_source == "current" else mb["old_logps"],
            mb["advantages"], mask, config=config, ref_logps=mb.get("ref_logps"), entropy=entropy,
            kl_coef=context["kl_coef"], num_tokens=context["num_tokens"], num_sequences=context["num_sequences"],
            sampler_logps=mb.get("sampler_logps"), **value_args, **ptx_args,
        )
        if "sampler_logps" in mb:
            metrics.update(sampler_diff(logps, mb["sampler_logps"], mask))
        return loss, micro_batch_metrics(metrics, mask, context, config.micro_batches)

    def value_loss_fn(vparams, mb, context, rng):
        mask = mb["completion_mask"]
        loss, metrics = ppo_value_objective(critic(vparams, mb, jax.random.fold_in(rng, 3)), mb["old_values"],
                                            mb["returns"], mask, config=config, num_tokens=context["num_tokens"],
                                            num_sequences=context["num_sequences"])
        return loss, micro_batch_metrics(metrics, mask, context, config.micro_batches)

    def update(carry, mb):
        policy, value, kl_coef = carry
        context = {**normalisers(mb["completion_mask"]), "kl_coef": kl_coef}
        if "ptx_mask" in mb:
            context["ptx_tokens"] = _checks.safe_denominator(jnp.sum(_checks.mask_f32(mb["ptx_mask"][:, 1:])))
        rng = step_key(policy)
        loss, grads, metrics = accumulate_gradients(policy_loss_fn, policy.params, mb, context, rng,
                                                    micro_batches=config.micro_batches)
        policy, opt_metrics = apply_gradients(policy, grads, loss, policy_optimizer, nonfinite=nonfinite,
                                              learning_rate=learning_rate)
        metrics = {"loss": loss, **metrics, **opt_metrics}
        if not shared:
            vloss, vgrads, vmetrics = accumulate_gradients(value_loss_fn, value.params, mb, context, rng,
                                                           micro_batches=config.micro_batches)
            value, vopt = apply_gradients(value, vgrads, vloss, value_optimizer, nonfinite=nonfinite)
            metrics.update(vmetrics)
            metrics["value/grad_norm"] = vopt["grad_norm"]
            metrics["nonfinite"] = metrics["nonfinite"] + vopt.get("nonfinite", 0.0)
        return (policy, value, kl_coef), metrics

    def step(state: RLState, batch) -> tuple[RLState, Metrics]:
        check_rl_batch(batch, config, group_size=1, name="ppo_step")
        if state.kl is None:
            raise ValueError("ppo_step: state.kl is None; initialise it with config.kl_controller().init()")
        if shared != (state.value is None):
            raise ValueError("ppo_step: state.value must be None exactly when the value head shares the "
                             f"policy's backbone (value_model is None); got value_model="
                             f"{'None' if shared else 'a model'} and state.value="
                             f"{'None' if state.value is None else 'a TrainState'}")
        policy, value = state.policy, state.value
        if shared and not (isinstance(policy.params, Mapping) and {"lm", "value_head"} <= set(policy.params)):
            keys = sorted(policy.params) if isinstance(policy.params, Mapping) else type(policy.params).__name__
            raise ValueError("ppo_step: with the value head on the policy's backbone (value_model None), "
                             "state.policy.params must be {'lm': <CausalLM params>, 'value_head': f32[E]}, got "
                             f"{keys}")
        if not shared and not (isinstance(value.params, Mapping) and "score" in value.params):
            raise ValueError("ppo_step: state.value.params has no scalar 'score' head (a language model's "
                             "parameters?); the critic's state holds value_model's parameters, e.g. the reward "
                             "model's")
        mask = batch["completion_mask"]
        data = {k: batch[k] for k in batch if k not in ("scores", "token_rewards")}
        if shared:
            logps, _, old_values = policy_forward(policy.params, batch, with_entropy=False)
            old_logps = jax.lax.stop_gradient(logps)
        else:
            old_values = critic(value.params, batch)
            old_logps = None
            if old_source == "recompute":
                old_logps = jax.lax.stop_gradient(rollout_logprobs(policy_model, policy.params, batch, config,
                                                                   with_entropy=False)[0])
        if old_source == "sampler":
            old_logps = batch["sampler_logps"]
        old_values = jax.lax.stop_gradient(_checks.apply_mask(old_values, mask))
        if old_source != "current":
            data["old_logps"] = old_logps
        kl_coef = state.kl.kl_coef
        kl_metrics: Metrics = {}
        reward_kl = None
        if "ref_logps" in batch and old_logps is not None:
            k1 = _checks.apply_mask(_checks.f32(old_logps) - _checks.f32(batch["ref_logps"]), mask)
            kl_metrics["kl/rollout_sequence"] = jnp.mean(jnp.sum(k1, axis=1))
            if config.kl_in_reward:
                estimator = config.kl_estimator_used
                reward_kl = k1 if estimator == "k1" else _checks.apply_mask(
                    kl_divergence(old_logps, batch["ref_logps"], estimator=estimator), mask)
        rewards = ppo_token_rewards(batch["scores"], mask, token_rewards=batch.get("token_rewards"),
                                    kl=reward_kl, kl_coef=kl_coef)
        if config.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, old_values, mask, gamma=config.gamma, lam=config.lam)
        if config.whiten_advantages:
            advantages = whiten(advantages, mask)
        data.update(advantages=advantages, returns=returns, old_values=old_values)
        (policy, value, _), stacked = run_updates(update, (policy, value, kl_coef), data, rng=step_key(policy),
                                                  num_epochs=config.num_epochs,
                                                  num_minibatches=config.num_minibatches)
        metrics = reduce_update_metrics(stacked)
        if old_source == "current" and "kl/sequence" in stacked:
            # One update, from the rollout policy itself: its forward's summed k1 is the rollout's.
            kl_metrics["kl/rollout_sequence"] = stacked["kl/sequence"][0]
        metrics.update(kl_metrics)
        metrics.update({
            "kl_coef": kl_coef,
            "explained_variance": _explained_variance(old_values, returns, mask),
            "values/mean": _checks.masked_mean(old_values, mask),
            "returns/mean": _checks.masked_mean(returns, mask),
            "advantages/mean": _checks.masked_mean(advantages, mask),
            "rewards/token_mean": _checks.masked_mean(rewards, mask),
            **rollout_stats(batch),
        })
        kl_state = state.kl
        if config.uses_reference and "kl/rollout_sequence" in kl_metrics:
            kl_state = controller.update(state.kl, kl_metrics["kl/rollout_sequence"], mask.shape[0])
        return RLState(policy, state.reference, value, kl_state), metrics

    vocab_size = policy_model.config.vocab_size
    if not shared:
        vocab_size = min(vocab_size, value_model.config.vocab_size)  # the critic reads the same tokens
    step.host_check = rollout_host_check(vocab_size)
    return step
