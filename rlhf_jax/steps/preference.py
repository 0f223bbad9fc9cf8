"""Offline preference steps: every DPO loss type, SimPO, ORPO (paired) and KTO (unpaired).

An *objective* is a small frozen config with the loss's hyperparameters
(`rlhf_jax.steps.preference_objectives`, re-exported here); `make_dpo_step` runs any of them. The step computes each completion's summed target log-prob and token count under the
policy (and under the frozen reference when the objective needs one), and the objective turns
those into per-example losses and implicit rewards through `rlhf_jax.losses`.

`make_dpo_step` returns the pure update; jit it with `common.jit_model_step(update, model, optim,
mesh=..., strategy=..., batch_keys=dpo_batch_keys(objective, reference),
frozen_params=int(dpo_takes_reference(objective, reference)))`. Per-example losses and implicit
rewards become TRL's metrics in one reducer, `rlhf_jax.losses.preference_metrics`.

Reference log-probs come either from a reference forward pass in every step
(`reference="model"`: `update(state, batch, reference_params)`), or from the batch
(`reference="precomputed"`: keys `ref_chosen_logps` / `ref_rejected_logps`, or `ref_logps` /
`ref_kl_logps` for KTO, made once over the dataset by `make_reference_logps_fn`), or, for a LoRA
policy, from its own frozen base with the adapters off (`reference="base"`: `update(state,
batch)`, no second copy of the weights).

Paired batch: `chosen_tokens`, `chosen_loss_mask`, `rejected_tokens`, `rejected_loss_mask`,
optional `*_positions` / `*_segment_ids` (packed rows: a pair's two sequences share row and
segment slot). Unpaired (KTO) batch: `tokens`, `loss_mask`, `label` (True = desirable), and the
mismatched completions `kl_tokens`, `kl_loss_mask` for KTO's reference point.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from rlhf_jax import _checks, sharding as sh
from rlhf_jax.logprobs import target_token_logprobs, token_logprobs
from rlhf_jax.losses import kto_loss, kto_reference_point, preference_metrics
from rlhf_jax.models.lora import LoraLM, base_params, head_needs_logits
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.rollout import shared_prompt_forward
from rlhf_jax.steps import batch_checks, common
from rlhf_jax.steps.preference_objectives import DPO, KTO, ORPO, Objective, PreferenceTerms, SequenceLogps, SimPO
from rlhf_jax.data.batches import segment_sums
from rlhf_jax.steps.sequences import causal_targets, deinterleave, forward_token_logps, side
from rlhf_jax.steps.supervised import PAIR_KEYS, pair_inputs

__all__ = [
    "SequenceLogps",
    "PreferenceTerms",
    "DPO",
    "SimPO",
    "ORPO",
    "KTO",
    "Objective",
    "ReferenceMode",
    "make_dpo_loss",
    "make_dpo_step",
    "dpo_batch_keys",
    "dpo_takes_reference",
    "make_reference_logps_fn",
    "precompute_reference_logps",
]

ReferenceMode = Literal["model", "precomputed", "base"]
UNPAIRED_KEYS = ("tokens", "loss_mask", "label")


# ------------------------------------------------------------------------------- sequence log-probs


TARGET_HEAD_CHUNK = 64   # positions per row per LM-head chunk of the targets-only head (W2: 3 of 4 chunks run)


def _side_logps(model, params, tokens, loss_mask, positions, segment_ids, *, max_segments: int,
                chunk_size: int | None, rng=None):
    """(SequenceLogps [B, S], token logps [B, T-1], target mask [B, T-1]) of one forward batch.

    With `chunk_size=None` the LM head runs on the target positions only (`target_token_logprobs`:
    the prompt's positions cost no head FLOPs and no pass over `[·, V]` logits); with a chunk size,
    on every position chunk by chunk (`chunked_token_logprobs`, bounded memory). A training pass with
    dropout on a LoRA `lm_head` adapter reads the forward's full logits either way (`head_needs_logits`).
    """
    targets = causal_targets(tokens, loss_mask, segment_ids)
    if chunk_size is None and not head_needs_logits(model, rng):
        out = model.forward(params, tokens, positions, segment_ids, rng=rng)   # its full logits are unused
        masked = target_token_logprobs(out.hidden[:, :-1], model.lm_head_weight(params), targets.labels,
                                       targets.mask, chunk_size=TARGET_HEAD_CHUNK)
    else:
        logps, _ = forward_token_logps(model, params, tokens, targets.labels, positions=positions,
                                       segment_ids=segment_ids, chunk_size=chunk_size, rng=rng)
        masked = jnp.where(targets.mask > 0, logps, 0.0)
    seq = SequenceLogps(segment_sums(masked, targets.segments, num_segments=max_segments),
                        segment_sums(targets.mask, targets.segments, num_segments=max_segments))
    return seq, masked, targets.mask


def _shared_prefix_logps(model, params, tokens, loss_mask, prefix_len: int, *, rng=None):
    """`_side_logps` of interleaved pair rows `[2B, T]` whose first `prefix_len` tokens the pair shares.

    The pair is a group of two rows sharing one prompt (`rollout.shared_prompt_forward` with
    `group_size=2`, as GRPO's groups): the chosen row's first `prefix_len` tokens (none of them a
    target) are prefilled once, and each row's tokens from the last prefix token on run on top of
    that cache: `B p + 2B (T - p)` token positions instead of `2B T`, forward and backward, with the
    same log-probs up to float rounding.

    A batch that breaks the contract (a target among the first `prefix_len` tokens, or chosen and
    rejected rows that differ there) gets NaN log-probs: the step's non-finite guard then skips it
    (`nonfinite="skip"`) or halts, instead of training on a wrong loss.
    """
    n, t = tokens.shape
    if prefix_len >= t:
        raise ValueError(f"make_dpo_step(shared_prefix_len={prefix_len}): rows of {t} tokens leave nothing after "
                         "the shared prefix; it must be shorter than the rows")
    targets = causal_targets(tokens, loss_mask)
    p = prefix_len - 1   # hidden states before position p predict prefix tokens only
    prompt_lengths = jnp.full((n,), prefix_len, jnp.int32)
    out = shared_prompt_forward(model, params, tokens[:, :prefix_len], prompt_lengths, tokens[:, prefix_len:],
                                group_size=2, rng=rng)
    mask, labels = targets.mask[:, p:], targets.labels[:, p:]
    if head_needs_logits(model, rng):
        logps = jnp.where(mask > 0, token_logprobs(out.logits, labels), 0.0)
    else:
        logps = target_token_logprobs(out.hidden, model.lm_head_weight(params), labels, mask,
                                      chunk_size=TARGET_HEAD_CHUNK)
    broken = jnp.any(targets.mask[:, :p] > 0) | jnp.any(tokens[0::2, :prefix_len] != tokens[1::2, :prefix_len])
    logps = jnp.where(broken, jnp.nan, logps)
    masked = jnp.concatenate([jnp.zeros((n, p), jnp.float32), logps], axis=1)
    seq = SequenceLogps(jnp.sum(masked, axis=1, keepdims=True), jnp.sum(targets.mask, axis=1, keepdims=True))
    return seq, masked, targets.mask


def _pair_logps(model, params, batch, *, max_segments, chunk_size, rng=None, shared_prefix: int | None = None):
    """Chosen and rejected `SequenceLogps` `[B, S]` (one interleaved forward), and the chosen NLL sum."""
    inputs = pair_inputs(batch)
    if shared_prefix:
        if inputs["segment_ids"] is not None or inputs["positions"] is not None:
            raise ValueError("make_dpo_step(shared_prefix_len=...): the batch has positions/segment_ids (packed "
                             "rows); prefix sharing needs one unpacked pair per row")
        seq, masked, _ = _shared_prefix_logps(model, params, inputs["tokens"], inputs["loss_mask"], shared_prefix,
                                              rng=rng)
    else:
        seq, masked, _ = _side_logps(model, params, inputs["tokens"], inputs["loss_mask"], inputs["positions"],
                                     inputs["segment_ids"], max_segments=max_segments, chunk_size=chunk_size,
                                     rng=rng)
    (cs, rs), (cc, rc) = deinterleave(seq.sum), deinterleave(seq.count)
    chosen_nll = -jnp.sum(deinterleave(masked)[0])
    return SequenceLogps(cs, cc), SequenceLogps(rs, rc), chosen_nll


def _unpaired_logps(model, params, batch, prefix, *, max_segments, chunk_size, rng=None):
    s = side(batch, prefix)
    seq, _, _ = _side_logps(model, params, s["tokens"], s["loss_mask"], s["positions"], s["segment_ids"],
                            max_segments=max_segments, chunk_size=chunk_size, rng=rng)
    return seq


def _map_micro(fn, batch, micro_batches: int):
    """`fn(batch)` on micro-batches with `lax.map`, results re-joined to full-batch rows."""
    if micro_batches == 1:
        return fn(batch)
    out = jax.lax.map(fn, common.split_micro_batches(batch, micro_batches))
    # [n, B/n, ...] -> [B, ...], undoing the interleaved split.
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:]), out)


def _reference_fn(model, objective: Objective, *, max_segments: int, chunk_size: int | None,
                  shared_prefix: int | None = None):
    """`(ref_params, batch) -> dict of [B, S] reference summed log-probs` (no gradient)."""

    def fn(params, batch):
        params = jax.lax.stop_gradient(params)
        if objective.paired:
            chosen, rejected, _ = _pair_logps(model, params, batch, max_segments=max_segments, chunk_size=chunk_size,
                                              shared_prefix=shared_prefix)
            return {"ref_chosen_logps": chosen.sum, "ref_rejected_logps": rejected.sum}
        out = {"ref_logps": _unpaired_logps(model, params, batch, "", max_segments=max_segments,
                                            chunk_size=chunk_size).sum}
        if objective.reference_point == "mismatched":
            out["ref_kl_logps"] = _unpaired_logps(model, params, batch, "kl_", max_segments=max_segments,
                                                  chunk_size=chunk_size).sum
        return out

    return fn


def _as_slots(x: jax.Array, key: str, b: int, max_segments: int) -> jax.Array:
    if x.shape == (b,) and max_segments == 1:
        return x[:, None]
    if x.shape == (b, max_segments):
        return x
    raise ValueError(f"batch[{key!r}] must have shape {(b,) if max_segments == 1 else (b, max_segments)}, got {x.shape}")


# ------------------------------------------------------------------------------------------ the step


def _seq_counts(batch, prefix: str, max_segments: int) -> jax.Array:
    """Target tokens of each sequence slot `[B, S]` on one side of a batch."""
    s = side(batch, prefix)
    t = causal_targets(s["tokens"], s["loss_mask"], s["segment_ids"])
    return segment_sums(t.mask, t.segments, num_segments=max_segments)


def _counts(batch, objective: Objective, max_segments: int) -> dict[str, jax.Array]:
    """Global normalisers: present examples (and chosen tokens for the NLL term, KTO subsets)."""
    if objective.paired:
        cc, rc = _seq_counts(batch, "chosen_", max_segments), _seq_counts(batch, "rejected_", max_segments)
        present = (cc > 0) & (rc > 0)
        return {"num_pairs": jnp.sum(present.astype(jnp.float32)), "num_chosen_tokens": jnp.sum(cc)}
    present = _seq_counts(batch, "", max_segments) > 0
    label = _as_slots(jnp.asarray(batch["label"]).astype(bool), "label", present.shape[0], max_segments)
    return {
        "num_examples": jnp.sum(present.astype(jnp.float32)),
        "num_desirable": jnp.sum((present & label).astype(jnp.float32)),
        "num_undesirable": jnp.sum((present & ~label).astype(jnp.float32)),
    }


def make_dpo_loss(model, objective: Objective, *, micro_batches: int = 1, max_segments: int = 1,
                  logits_chunk_size: int | None = None, shared_prefix_len: int | None = None) -> common.LossFn:
    """The micro-batch loss of a preference objective (reference log-probs already in the batch).

    Paired: `L_k = sum_{pairs in k} l_i / P + w_nll sum_{chosen targets in k} (-log pi) / N_c`, with
    `P` the pairs and `N_c` the chosen target tokens of the full batch. KTO:
    `L_k = sum_{examples in k} l_i / E`. Metrics (TRL's names, means over the batch):
    `rewards/chosen`, `rewards/rejected`, `rewards/accuracies` (paired), `rewards/margins`,
    `logps/chosen`, `logps/rejected`, `nll_loss` (with an NLL term), ORPO's `log_odds_ratio`,
    KTO's `kl` and `count/chosen`, `count/rejected` (the batch's desirable and undesirable examples;
    TRL computes them as the weights of its means and leaves them out of its logs). A KTO batch
    without one class gives 0 for that class's means (and a margin equal to the other side's mean)
    beside its count of 0; the run's logs leave those out (`rlhf_jax.metrics.without_empty_means`).

    Args:
      model: a `CausalLM` with an LM head (the policy).
      objective: `DPO`, `SimPO`, `ORPO` or `KTO`.
      micro_batches: the step's micro-batch count (for the metrics' shares).
      max_segments: examples per row of packed batches (1 = unpacked).
      logits_chunk_size: chunked log-probs from hidden states (see `make_sft_loss`).
      shared_prefix_len: see `make_dpo_step`.

    Returns:
      `loss_fn(params, batch, context, rng) -> (loss, metrics)`.
    """
    sg = jax.lax.stop_gradient

    def shares(metrics):
        """Batch means -> this micro-batch's share (`common.micro_share`: they average back up)."""
        return {k: v * micro_batches for k, v in metrics.items()}

    def paired_loss(params, batch, context, rng):
        chosen, rejected, chosen_nll = _pair_logps(model, params, batch, max_segments=max_segments,
                                                   chunk_size=logits_chunk_size, rng=rng,
                                                   shared_prefix=shared_prefix_len)
        b = chosen.sum.shape[0]
        ref_c = ref_r = None
        if objective.needs_reference:
            cc = _as_slots(batch["ref_chosen_logps"], "ref_chosen_logps", b, max_segments)
            rr = _as_slots(batch["ref_rejected_logps"], "ref_rejected_logps", b, max_segments)
            ref_c = SequenceLogps(cc.reshape(-1), chosen.count.reshape(-1))
            ref_r = SequenceLogps(rr.reshape(-1), rejected.count.reshape(-1))
        flat = lambda s: SequenceLogps(s.sum.reshape(-1), s.count.reshape(-1))  # noqa: E731
        fc, fr = flat(chosen), flat(rejected)
        terms = objective(fc, fr, ref_c, ref_r)
        w = ((fc.count > 0) & (fr.count > 0)).astype(jnp.float32)
        n = context["num_pairs"]
        loss = jnp.sum(terms.losses * w) / jnp.maximum(n, 1.0)
        metrics = shares(preference_metrics(terms.chosen_rewards, terms.rejected_rewards, terms.chosen_logps,
                                            terms.rejected_logps, weights=w, count=n, extra=terms.extra))
        if objective.nll_weight:
            nll = chosen_nll / jnp.maximum(context["num_chosen_tokens"], 1.0)
            loss = loss + objective.nll_weight * nll
            metrics["nll_loss"] = sg(nll) * micro_batches
        return loss, metrics

    def kto_loss_fn(params, batch, context, rng):
        seq = _unpaired_logps(model, params, batch, "", max_segments=max_segments, chunk_size=logits_chunk_size,
                              rng=rng)
        b = seq.sum.shape[0]
        label = _as_slots(jnp.asarray(batch["label"]).astype(bool), "label", b, max_segments).reshape(-1)
        ref = _as_slots(batch["ref_logps"], "ref_logps", b, max_segments).reshape(-1)
        logps = seq.sum.reshape(-1)
        losses, _ = kto_loss(logps, ref, label, context["kl"], beta=objective.beta,
                             desirable_weight=objective.desirable_weight,
                             undesirable_weight=objective.undesirable_weight)
        w = (seq.count.reshape(-1) > 0).astype(jnp.float32)
        loss = jnp.sum(losses * w) / jnp.maximum(context["num_examples"], 1.0)
        rewards = objective.beta * (logps - ref)
        metrics = shares(preference_metrics(rewards, rewards, logps, logps, weights=w * label,
                                            count=context["num_desirable"], rejected_weights=w * ~label,
                                            rejected_count=context["num_undesirable"]))
        metrics["kl"] = context["kl"]
        # whole-batch counts (the same in every micro-batch, so their mean is the batch's)
        metrics["count/chosen"], metrics["count/rejected"] = context["num_desirable"], context["num_undesirable"]
        return loss, metrics

    return paired_loss if objective.paired else kto_loss_fn


def dpo_step_context(model, objective: Objective, reference: ReferenceMode, *, micro_batches: int,
                     max_segments: int, chunk_size: int | None, shared_prefix: int | None = None):
    """The step's `prepare(params, batch, frozen, rng) -> (batch, context)`: the batch's counts, the
    reference's log-probs (reference "model" / "base") and KTO's z0 over the whole batch (policy log-probs
    of the mismatched KL rows, no gradient); held-out KTO evaluation uses it too (`train.dpo`)."""
    ref_model = model.base if reference == "base" else model  # QLoRA: the base dequantizes in its forward
    ref_fn = _reference_fn(ref_model, objective, max_segments=max_segments, chunk_size=chunk_size,
                           shared_prefix=shared_prefix)

    def prepare(params, batch, frozen, rng):
        del rng
        context = _counts(batch, objective, max_segments)
        if objective.needs_reference and reference in ("model", "base"):
            (ref_params,) = frozen if reference == "model" else (base_params(params),)
            batch = {**batch, **_map_micro(lambda mb: ref_fn(ref_params, mb), batch, micro_batches)}
        if not objective.paired:
            if objective.reference_point == "zero":
                context["kl"] = jnp.zeros((), jnp.float32)
            else:
                policy_kl = _map_micro(
                    lambda mb: _unpaired_logps(model, jax.lax.stop_gradient(params), mb, "kl_",
                                               max_segments=max_segments, chunk_size=chunk_size).sum,
                    batch, micro_batches)
                ref_kl = _as_slots(batch["ref_kl_logps"], "ref_kl_logps", policy_kl.shape[0], max_segments)
                present = (_seq_counts(batch, "kl_", max_segments) > 0).astype(jnp.float32)
                # z0 = max(0, mean KL) over the present mismatched completions (empty packed slots
                # are left out): kto_reference_point on the one-element batch of that mean.
                kl = jnp.sum((policy_kl - ref_kl) * present) / jnp.maximum(jnp.sum(present), 1.0)
                context["kl"] = kto_reference_point(kl[None], jnp.zeros((1,), jnp.float32))
        return batch, context

    return prepare


def dpo_batch_keys(objective: Objective | None = None, reference: ReferenceMode = "model") -> tuple[str, ...]:
    """The keys every batch of `make_dpo_step(objective=..., reference=...)` must have."""
    objective = DPO() if objective is None else objective
    if objective.paired:
        keys = PAIR_KEYS
        if objective.needs_reference and reference == "precomputed":
            keys += ("ref_chosen_logps", "ref_rejected_logps")
        return keys
    keys = UNPAIRED_KEYS
    if objective.reference_point == "mismatched":
        keys += ("kl_tokens", "kl_loss_mask")
    if reference == "precomputed":
        keys += ("ref_logps",) + (("ref_kl_logps",) if objective.reference_point == "mismatched" else ())
    return keys


def dpo_takes_reference(objective: Objective | None = None, reference: ReferenceMode = "model") -> bool:
    """Whether the update is `update(state, batch, reference_params)` (else `update(state, batch)`)."""
    objective = DPO() if objective is None else objective
    return objective.needs_reference and reference == "model"


def make_dpo_step(model, optimizer: OptimizerConfig | optax.GradientTransformation, *,
                  objective: Objective | None = None, reference: ReferenceMode = "model", micro_batches: int = 1,
                  max_segments: int = 1, logits_chunk_size: int | None = None, shared_prefix_len: int | None = None,
                  nonfinite: common.NonFinitePolicy = "skip") -> common.Update:
    """A preference-optimisation update for any objective of this module (pure; jit it).

    With `reference="model"` and an objective that needs a reference (`dpo_takes_reference`), the
    update is `update(state, batch, reference_params)`: the frozen reference runs forward on the
    whole batch (micro-batch by micro-batch, no gradient) before the policy's gradient pass.
    Otherwise it is `update(state, batch)`, with precomputed reference log-probs in the batch when
    needed.

    Args:
      model: the policy `CausalLM` (the reference has the same architecture), or a `LoraLM`.
      optimizer: an `OptimizerConfig` or an optax transform.
      objective: `DPO(...)` (default), `SimPO(...)`, `ORPO(...)` or `KTO(...)`.
      reference: "model", "precomputed" or, for a `LoraLM` policy, "base" (its frozen base with
        adapters off; ignored by reference-free objectives).
      micro_batches: gradient-accumulation micro-batches per step.
      max_segments: examples per row of packed batches (1 = unpacked).
      logits_chunk_size: chunked log-probs from hidden states over every position (bounded memory);
        None (default): the LM head runs only on target positions (`target_token_logprobs`).
      shared_prefix_len: `p` when the first `p` tokens of every pair's chosen and rejected rows are
        the same and none of them is a target (a prompt of at least `p` tokens): those tokens run
        once per pair (prefix sharing, as GRPO's groups do), the rest of each row on top of their
        KV cache; same losses. A batch breaking this gets a non-finite loss (skipped or halted by
        `nonfinite`). Paired objectives, unpacked rows only.
      nonfinite: NaN/Inf policy.

    Returns:
      The pure update; jit it with `common.jit_model_step(update, model, optimizer, mesh=...,
      strategy=..., micro_batches=..., batch_keys=dpo_batch_keys(objective, reference),
      frozen_params=int(dpo_takes_reference(objective, reference)))`. Metrics: those of
      `make_dpo_loss` plus `loss`, `grad_norm`, `learning_rate`, `nonfinite`.
    """
    objective = DPO() if objective is None else objective
    if not isinstance(objective, (DPO, SimPO, ORPO, KTO)):
        raise TypeError(f"make_dpo_step: objective must be DPO, SimPO, ORPO or KTO, got {type(objective).__name__}")
    if reference not in get_args(ReferenceMode):
        raise ValueError(f"make_dpo_step: reference must be one of {get_args(ReferenceMode)}, got {reference!r}")
    if reference == "base" and not isinstance(model, LoraLM):
        raise ValueError("make_dpo_step: reference='base' needs a LoraLM policy (the reference is its base with "
                         f"the adapters off), got {type(model).__name__}")
    if shared_prefix_len is not None:
        if not objective.paired or max_segments != 1 or not isinstance(shared_prefix_len, int) \
                or isinstance(shared_prefix_len, bool) or shared_prefix_len < 2:
            raise ValueError("make_dpo_step: shared_prefix_len must be an int >= 2 with a paired objective and "
                             f"unpacked rows (max_segments=1), got {shared_prefix_len!r} with "
                             f"{type(objective).__name__}, max_segments={max_segments}")
    tx, schedule = common.resolve_optimizer(optimizer)
    loss_fn = make_dpo_loss(model, objective, micro_batches=micro_batches, max_segments=max_segments,
                            logits_chunk_size=logits_chunk_size, shared_prefix_len=shared_prefix_len)
    prepare = dpo_step_context(model, objective, reference, micro_batches=micro_batches, max_segments=max_segments,
                               chunk_size=logits_chunk_size, shared_prefix=shared_prefix_len)
    update = common.make_update(loss_fn, tx, prepare=prepare, micro_batches=micro_batches, nonfinite=nonfinite,
                                learning_rate=schedule)
    # jit_step runs it on every batch
    update.host_check = batch_checks.host_batch_check(model.config.vocab_size, max_segments=max_segments)
    return update


def make_reference_logps_fn(model, *, mesh: Mesh, objective: Objective | None = None,
                            strategy: str | sh.Strategy = "fsdp", max_segments: int = 1,
                            logits_chunk_size: int | None = None, micro_batches: int = 1):
    """A jitted `(reference_params, batch) -> dict of summed reference log-probs` for precomputing.

    Paired objectives get `ref_chosen_logps`, `ref_rejected_logps`; KTO gets `ref_logps` (and
    `ref_kl_logps` for its mismatched completions); each `[B]` (or `[B, S]` when packed). Add them
    to the batches (`precompute_reference_logps`) and build the step with `reference="precomputed"`.

    With `micro_batches` n > 1 the batch runs in n pieces, one after another under `lax.map` inside
    the one program (the update step's interleaved micro-batches, `common.split_micro_batches`), so
    the pass holds one micro-batch's activations, as the step does; each row's log-probs depend on
    that row alone, so the values equal the one-piece pass. A batch whose rows n does not divide is
    a `ValueError` naming the batch key and `micro_batches`.
    """
    objective = DPO() if objective is None else objective
    strategy = sh.check_strategy(strategy, mesh)
    _checks.check_micro_split(None, micro_batches, "make_reference_logps_fn")
    fn = _reference_fn(model, objective, max_segments=max_segments, chunk_size=logits_chunk_size)

    def squeeze(out):
        return {k: v[:, 0] for k, v in out.items()} if max_segments == 1 else out

    param_shardings = sh.param_shardings(model.abstract_params(), model.logical_axes, mesh=mesh, strategy=strategy)
    def traced(p, b):
        if micro_batches > 1:
            _checks.check_micro_split(b, micro_batches, "make_reference_logps_fn")
        with sh.activation_sharding(mesh, strategy):  # activations split like the batch, as in the step
            return squeeze(_map_micro(lambda mb: fn(p, mb), b, micro_batches))

    jitted = jax.jit(traced, in_shardings=(param_shardings, sh.batch_sharding(mesh, strategy)),
                     out_shardings=sh.batch_sharding(mesh, strategy))

    def reference_logps(params, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        sh.check_batch(batch, mesh=mesh, strategy=strategy)
        _checks.check_micro_split(batch, micro_batches, "make_reference_logps_fn")
        batch_checks.check_segment_ids(batch, max_segments, name="make_reference_logps_fn")
        return jitted(params, dict(batch))

    reference_logps.program = jitted  # what `rlhf-jax compile` lowers
    return reference_logps


def precompute_reference_logps(reference_logps, reference_params, batches: Iterable[Mapping[str, Any]]
                               ) -> Iterator[dict[str, Any]]:
    """Yield each batch with its reference log-probs added as host (numpy) arrays.

    Args:
      reference_logps: the function of `make_reference_logps_fn`.
      reference_params: the frozen reference parameters.
      batches: host batches (e.g. one pass over the dataset, then cached by the caller).
    """
    for batch in batches:
        out = reference_logps(reference_params, batch)
        yield {**batch, **{k: np.asarray(v) for k, v in out.items()}}
