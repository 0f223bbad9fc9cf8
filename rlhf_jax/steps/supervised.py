"""Supervised steps: SFT (next-token cross-entropy) and reward-model training (Bradley-Terry).

Both are `make_*` closures returning the pure `update(state, batch) -> (state, metrics)`; jit it
with `common.jit_model_step(update, model, optimizer, mesh=..., strategy=..., batch_keys=SFT_KEYS)`
(`PAIR_KEYS` for the reward model).

SFT batch: `tokens` int [B, T], `loss_mask` [B, T] (1 on trained tokens), optional `positions`
and `segment_ids` (packed rows). Reward-model batch: `chosen_*` and `rejected_*` versions of those
keys (a pair's chosen and rejected sequences in the same row and segment slot of their arrays) and
an optional `margin` ([B], or [B, S] for packed rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.data.batches import segment_last_index
from rlhf_jax.losses import bradley_terry_loss, sft_loss
from rlhf_jax.models.heads import gather_last, last_token_index
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.steps import batch_checks, common
from rlhf_jax.steps.sequences import (
    causal_targets,
    deinterleave,
    forward_token_logps,
    interleave,
    pad_time,
    shifted_label_is_argmax,
    side,
)

__all__ = ["SFT_KEYS", "PAIR_KEYS", "make_sft_loss", "make_sft_step", "make_reward_model_loss",
           "make_reward_model_step"]

SFT_KEYS = ("tokens", "loss_mask")
PAIR_KEYS = ("chosen_tokens", "chosen_loss_mask", "rejected_tokens", "rejected_loss_mask")


def _sft_prepare(params, batch, frozen, rng):
    del params, frozen, rng
    targets = causal_targets(batch["tokens"], batch["loss_mask"], batch.get("segment_ids"))
    return batch, {"num_tokens": jnp.sum(targets.mask)}


def make_sft_loss(model, *, micro_batches: int = 1, logits_chunk_size: int | None = None) -> common.LossFn:
    """The SFT micro-batch loss: token-mean negative log-likelihood over the whole batch's targets.

    `L_k = sum_{(b,t) in micro-batch k} m_bt (-log pi(x_{b,t+1} | x_{b,<=t})) / N`, `N` = target
    tokens of the full batch (`context["num_tokens"]`), so `sum_k L_k` is the batch's token mean.

    Metrics (TRL's names): `mean_token_accuracy` (argmax = label, ties counted correct, over the
    whole batch's targets: TRL averages per-micro-batch ratios instead; only with full logits, i.e.
    `logits_chunk_size=None`) and `num_tokens` (target tokens in this batch; TRL's `num_tokens` is
    the running total of input tokens, prompts included).

    Args:
      model: a `CausalLM` with an LM head.
      micro_batches: the step's micro-batch count (to scale the metrics' micro-batch shares).
      logits_chunk_size: compute log-probs from hidden states `chunk_size` tokens at a time
        instead of materialising `[B, T, V]` logits (for large vocabularies).

    Returns:
      `loss_fn(params, batch, context, rng) -> (loss, metrics)`.
    """

    def loss_fn(params, batch, context, rng):
        targets = causal_targets(batch["tokens"], batch["loss_mask"], batch.get("segment_ids"))
        n = context["num_tokens"]
        metrics = {"num_tokens": n}
        if logits_chunk_size is None:
            out = model.forward(params, batch["tokens"], batch.get("positions"), batch.get("segment_ids"), rng=rng)
            # On all T positions, the last one masked (slicing [B, T, V] logits would pad their gradient).
            t = out.logits.shape[1]
            per_token = sft_loss(out.logits, pad_time(targets.labels, t), pad_time(targets.mask, t))
            correct = shifted_label_is_argmax(out.logits, targets.labels) * targets.mask
            metrics["mean_token_accuracy"] = common.micro_share(jnp.sum(correct), n, micro_batches)
        else:
            logps, _ = forward_token_logps(model, params, batch["tokens"], targets.labels,
                                           positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                                           chunk_size=logits_chunk_size, rng=rng)
            per_token = -logps * targets.mask
        loss = jnp.sum(per_token) / jnp.maximum(n, 1.0)
        return loss, metrics

    return loss_fn


def make_sft_step(model, optimizer: OptimizerConfig | optax.GradientTransformation, *, micro_batches: int = 1,
                  nonfinite: common.NonFinitePolicy = "skip", logits_chunk_size: int | None = None) -> common.Update:
    """A supervised fine-tuning update `update(state, batch) -> (state, metrics)` (pure; jit it).

    Loss: token-mean cross-entropy over `loss_mask` targets (Ouyang et al. 2022 for chat SFT),
    normalised by the whole batch's target count however it is split into micro-batches.
    The jitted step refuses (ValueError, before compiling) host batches with token ids outside the
    vocabulary or a `loss_mask` other than 0/1. A batch without any target token (`num_tokens` 0)
    has loss 0 and zero gradients, and the optimizer still steps (moments, weight decay), as an
    empty batch does in every step of this package (best-of-n relies on it); TRL's loss is NaN there.

    Args:
      model: a `CausalLM` with an LM head.
      optimizer: an `OptimizerConfig` (then `learning_rate` is logged) or an optax transform.
      micro_batches: gradient-accumulation micro-batches per step.
      nonfinite: NaN/Inf policy: "skip", "halt" or "off".
      logits_chunk_size: see `make_sft_loss`.

    Returns:
      The pure update; jit it with `common.jit_model_step(update, model, optimizer, mesh=...,
      strategy=..., micro_batches=..., batch_keys=SFT_KEYS)`, and create its state with
      `create_train_state(model.init, make_optimizer(config), ...)` on the same mesh and strategy.
      Metrics: `loss`, `grad_norm`, `learning_rate`, `mean_token_accuracy`, `num_tokens`, `nonfinite`.
    """
    if model.head != "lm":
        raise ValueError(f"make_sft_step needs an LM-head model: CausalLM(config) (head='lm'), got head={model.head!r}")
    tx, schedule = common.resolve_optimizer(optimizer)
    loss_fn = make_sft_loss(model, micro_batches=micro_batches, logits_chunk_size=logits_chunk_size)
    update = common.make_update(loss_fn, tx, prepare=_sft_prepare, micro_batches=micro_batches,
                                nonfinite=nonfinite, learning_rate=schedule)
    update.host_check = batch_checks.host_batch_check(model.config.vocab_size)  # jit_step runs it on every batch
    return update


# ------------------------------------------------------------------------------------- reward model


def pair_inputs(batch) -> dict[str, jax.Array | None]:
    """Chosen and rejected sides interleaved into one `[2B, T]` forward batch (padded to one T)."""
    c, r = side(batch, "chosen_"), side(batch, "rejected_")
    for key in ("positions", "segment_ids"):
        if (c[key] is None) != (r[key] is None):
            raise KeyError(f"batch has {'chosen' if c[key] is not None else 'rejected'}_{key} but not the other side's")
    t = max(c["tokens"].shape[1], r["tokens"].shape[1])
    out = {}
    for key in ("tokens", "loss_mask", "positions", "segment_ids"):
        if c[key] is None:
            out[key] = None
        else:
            out[key] = interleave(pad_time(c[key], t), pad_time(r[key], t))
    return out


def _pair_presence(batch, max_segments: int):
    """bool [B, S] pairs present in the batch (both completions have a target token)."""
    present = []
    for prefix in ("chosen_", "rejected_"):
        s = side(batch, prefix)
        targets = causal_targets(s["tokens"], s["loss_mask"], s["segment_ids"])
        counts = jax.nn.one_hot(targets.segments - 1, max_segments, dtype=jnp.float32).sum(axis=1)
        present.append(counts > 0)
    return present[0] & present[1]


def _rm_prepare(max_segments: int):
    def prepare(params, batch, frozen, rng):
        del params, frozen, rng
        return batch, {"num_pairs": jnp.sum(_pair_presence(batch, max_segments).astype(jnp.float32))}

    return prepare


def _input_tokens(batch) -> jax.Array:
    """Tokens the model reads to score a pair batch's chosen and rejected sequences (TRL's
    `attention_mask.sum()`): rows with segment ids count their non-padding tokens; rows without count
    the tokens up to their last target, where the reward is read (none for a row without a target)."""
    total = jnp.zeros((), jnp.float32)
    for prefix in ("chosen_", "rejected_"):
        s = side(batch, prefix)
        if s["segment_ids"] is not None:
            total += jnp.sum(s["segment_ids"] > 0, dtype=jnp.float32)
        else:
            real = jnp.any(s["loss_mask"] > 0, axis=1)
            total += jnp.sum(jnp.where(real, last_token_index(s["loss_mask"]) + 1, 0), dtype=jnp.float32)
    return total


def _check_margin(margin, b: int, max_segments: int):
    if margin is None:
        return None
    if margin.shape == (b,) and max_segments == 1:
        return margin[:, None]
    if margin.shape == (b, max_segments):
        return margin
    raise ValueError(f"batch['margin'] must have shape {(b,) if max_segments == 1 else (b, max_segments)}, "
                     f"got {margin.shape}")


def make_reward_model_loss(model, *, micro_batches: int = 1, max_segments: int = 1,
                           center_rewards_coefficient: float = 0.0) -> common.LossFn:
    """The reward-model micro-batch loss: mean Bradley-Terry loss over the batch's pairs.

    Each sequence's reward is the scalar head's value at its last token (the last target token of
    an unpacked row, the last token of its segment in a packed row). Per pair
    `l = -log sigmoid(r_c - r_r - margin) + eta (r_c + r_r)^2`, summed and divided by the pair count
    of the full batch (`context["num_pairs"]`).

    Metrics: `accuracy` (r_c > r_r), `margin` (mean r_c - r_r), `rewards/chosen`, `rewards/rejected`,
    and TRL's `mean_reward`, `min_reward`, `max_reward` over the batch's chosen and rejected rewards
    (the whole batch's minimum / maximum over micro-batches and devices: +inf / -inf for a batch
    without a pair; TRL's logged value is the mean of its micro-batches' extremes) and `num_tokens`,
    the tokens read in this batch (`_input_tokens`; TRL's is the running total of its training).

    Args:
      model: a `CausalLM(config, head="scalar")`.
      micro_batches: the step's micro-batch count (for the metrics' shares).
      max_segments: pairs per row of packed batches (1 = unpacked).
      center_rewards_coefficient: `eta` (Eisenstein et al. 2023).

    Returns:
      `loss_fn(params, batch, context, rng) -> (loss, metrics)`.
    """

    def loss_fn(params, batch, context, rng):
        inputs = pair_inputs(batch)
        out = model.forward(params, inputs["tokens"], inputs["positions"], inputs["segment_ids"], rng=rng)
        if out.values is None:
            raise ValueError("make_reward_model_step needs a scalar-head model: CausalLM(config, head='scalar')")
        if inputs["segment_ids"] is None:
            if max_segments != 1:
                raise ValueError(f"max_segments={max_segments} needs chosen_/rejected_segment_ids in the batch")
            rewards = gather_last(out.values, inputs["loss_mask"])[:, None]
        else:
            index = segment_last_index(inputs["segment_ids"], num_segments=max_segments)
            rewards = jnp.take_along_axis(out.values, index, axis=1)
        chosen, rejected = deinterleave(rewards)
        present = _pair_presence(batch, max_segments)
        margin = _check_margin(batch.get("margin"), present.shape[0], max_segments)
        flat = lambda x: None if x is None else x.reshape(-1)  # noqa: E731
        losses = bradley_terry_loss(flat(chosen), flat(rejected), margin=flat(margin),
                                    center_rewards_coefficient=center_rewards_coefficient)
        w = flat(present).astype(jnp.float32)
        n = context["num_pairs"]
        share = lambda x: common.micro_share(jnp.sum(x * w), n, micro_batches)  # noqa: E731
        c, r = jax.lax.stop_gradient(flat(chosen)), jax.lax.stop_gradient(flat(rejected))
        # min / max: the identity where no pair is present (micro-batches combine them by min / max)
        metrics = {
            "accuracy": share((c > r).astype(jnp.float32)),
            "margin": share(c - r),
            "rewards/chosen": share(c),
            "rewards/rejected": share(r),
            "mean_reward": share(c + r) / 2,
            "min_reward": jnp.min(jnp.where(w > 0, jnp.minimum(c, r), jnp.inf)),
            "max_reward": jnp.max(jnp.where(w > 0, jnp.maximum(c, r), -jnp.inf)),
            "num_tokens": _input_tokens(batch) * micro_batches,   # a micro-batch's share of the sum
        }
        return jnp.sum(losses * w) / jnp.maximum(n, 1.0), metrics

    return loss_fn


def make_reward_model_step(model, optimizer: OptimizerConfig | optax.GradientTransformation, *,
                           micro_batches: int = 1, max_segments: int = 1, center_rewards_coefficient: float = 0.0,
                           nonfinite: common.NonFinitePolicy = "skip") -> common.Update:
    """A reward-model update on preference pairs (Bradley-Terry; Ouyang et al. 2022), pure; jit it.

    Chosen and rejected sequences go through the model in one `[2B, T]` forward pass (rows
    interleaved so that data-parallel shards stay local).

    Args:
      model: a `CausalLM(config, head="scalar")`.
      optimizer: an `OptimizerConfig` or an optax transform.
      micro_batches: gradient-accumulation micro-batches per step.
      max_segments: pairs per row of packed batches (1 = unpacked).
      center_rewards_coefficient: reward-centering weight (TRL's `center_rewards_coefficient`).
      nonfinite: NaN/Inf policy.

    Returns:
      The pure `update(state, batch) -> (state, metrics)`; jit it with `common.jit_model_step(...,
      batch_keys=PAIR_KEYS)`. Metrics `loss`, `accuracy`, `margin`, `rewards/chosen`,
      `rewards/rejected`, `mean_reward`, `min_reward`, `max_reward`, `num_tokens`
      (`make_reward_model_loss`), `grad_norm`, `learning_rate`, `nonfinite`.
    """
    tx, schedule = common.resolve_optimizer(optimizer)
    loss_fn = make_reward_model_loss(model, micro_batches=micro_batches, max_segments=max_segments,
                                     center_rewards_coefficient=center_rewards_coefficient)
    update = common.make_update(loss_fn, tx, prepare=_rm_prepare(max_segments), micro_batches=micro_batches,
                                nonfinite=nonfinite, learning_rate=schedule)
    # jit_step runs it on every batch
    update.host_check = batch_checks.host_batch_check(model.config.vocab_size, max_segments=max_segments)
    return update
