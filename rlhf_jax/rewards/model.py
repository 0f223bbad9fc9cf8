"""Reward-model scoring as a reward source: jitted, batched in fixed-size chunks, optionally sharded.

A reward model is a `CausalLM(config, head="scalar")` trained with a Bradley-Terry loss; it reads
the prompt + completion joined as the policy sees it (`rlhf_jax.rollout.join_sequences`) and scores
it at the last real token (the EOS when there is one). It must share the policy's vocabulary: the
token ids are passed as they are (no decoding, re-tokenizing or chat template of the reward model's
own), so a different vocabulary would silently score other text, and `RewardModelReward` refuses it.
Nothing is truncated: a prompt + completion longer than the reward model's `max_position_embeddings`
is scored whole (as transformers would), with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rlhf_jax import sharding as sh
from rlhf_jax.rewards.base import RewardInputs
from rlhf_jax.rollout import check_prompt_lengths, sequence_scores
from rlhf_jax.state import place_params

__all__ = ["RewardModelReward", "check_same_vocabulary"]


def check_same_vocabulary(
    policy_vocab_size: int,
    reward_vocab_size: int,
    *,
    policy_tokenizer: Any | None = None,
    reward_tokenizer: Any | None = None,
) -> None:
    """Raise ValueError when a reward model cannot read the policy's token ids.

    The sizes of the embedding tables must match; when both tokenizers are given, their
    token -> id maps (`get_vocab()`) must be identical too (same size but shuffled ids is caught).
    A larger reward-model table is accepted when both tokenizers are given and identical: one family's
    checkpoints pad the same tokenizer's table to different sizes (Qwen2.5-7B 152064, Qwen2.5-1.5B
    151936), and every id the policy can sample is then a row of the reward model's. A smaller one
    never is: the policy could sample an id the reward model has no embedding for.

    Args:
      policy_vocab_size: the policy's `ModelConfig.vocab_size`.
      reward_vocab_size: the reward model's `ModelConfig.vocab_size`.
      policy_tokenizer, reward_tokenizer: optional Hugging Face tokenizers.
    """
    both = policy_tokenizer is not None and reward_tokenizer is not None
    if policy_vocab_size != reward_vocab_size and not (both and reward_vocab_size > policy_vocab_size):
        advice = ("the policy could sample ids it has no embedding for" if reward_vocab_size < policy_vocab_size
                  else "a larger, padded table is accepted only when both tokenizers are given and identical")
        raise ValueError(
            f"reward model vocabulary differs from the policy's: vocab_size {reward_vocab_size} vs "
            f"{policy_vocab_size} ({advice}); train the reward model with the policy's tokenizer"
        )
    if both:
        pv, rv = policy_tokenizer.get_vocab(), reward_tokenizer.get_vocab()
        if pv != rv:
            diff = sorted(set(pv.items()) ^ set(rv.items()))[:5]
            raise ValueError(
                f"reward model tokenizer differs from the policy's ({len(rv)} vs {len(pv)} entries; "
                f"first differing (token, id) pairs: {diff})"
            )


class RewardModelReward:
    """A reward source that scores rollouts with a scalar-head reward model.

    Rows are scored `batch_size` at a time by one jitted program (the last chunk is padded, so
    only one program is ever compiled per prompt/completion width). With a `mesh`, the parameters
    are placed by `strategy` and each chunk is split over the strategy's batch axes.

    Example:
      >>> rm = RewardModelReward(rm_model, rm_params, policy_vocab_size=policy_config.vocab_size)
      >>> result = combine_rewards([rm, missing_eos_penalty(1.0)], inputs)
    """

    def __init__(
        self,
        model,
        params,
        *,
        policy_vocab_size: int,
        policy_tokenizer: Any | None = None,
        reward_tokenizer: Any | None = None,
        batch_size: int = 64,
        name: str = "reward_model",
        mesh: Mesh | None = None,
        strategy: str = "dp",
    ):
        if model.head != "scalar":
            raise ValueError(f"RewardModelReward: the reward model needs head='scalar', got head={model.head!r}")
        check_same_vocabulary(policy_vocab_size, model.config.vocab_size,
                              policy_tokenizer=policy_tokenizer, reward_tokenizer=reward_tokenizer)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"RewardModelReward: batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        self.name = name
        self.batch_size = batch_size
        self._data_sharding = None
        if mesh is not None:
            ways = sh.batch_axis_size(mesh, strategy)
            if batch_size % ways:
                raise ValueError(f"RewardModelReward: batch_size {batch_size} is not divisible by the {ways} "
                                 f"data-parallel shards of mesh {dict(mesh.shape)}")
            params = place_params(params, model.logical_axes, mesh=mesh, strategy=strategy)
            self._data_sharding = sh.batch_sharding(mesh, strategy)
        self._mesh, self._strategy = mesh, strategy
        self.params = params
        self._warned_long = False

        def score(p, *rollout):
            if mesh is None:
                return sequence_scores(model, p, *rollout)
            with sh.activation_sharding(mesh, strategy):  # activations split like the rows, as in training
                return sequence_scores(model, p, *rollout)

        self._score = jax.jit(score)

    def score(self, prompt_tokens, prompt_lengths, completion_tokens, completion_mask) -> np.ndarray:
        """float32 `[N]` scores of the rollout arrays (host or device), chunk by chunk.

        `r_b = w . hidden(prompt_b ++ completion_b)[last real token]` (see
        `rlhf_jax.rollout.sequence_scores`): the completion's last token whose mask is 1. Tokens
        masked out before it (an agentic trajectory's observations, whose mask is the action mask)
        are read as context, as the policy reads them.
        """
        arrays = self._checked(*(np.asarray(a) for a in (prompt_tokens, prompt_lengths, completion_tokens,
                                                         completion_mask)))
        n = arrays[0].shape[0]
        processes = jax.process_count() if self._data_sharding is not None else 1
        if processes > 1:
            # Each process scores its own rows: a chunk is `batch_size / processes` rows of every
            # process, placed as one global array; every process runs the same number of chunks.
            from rlhf_jax.distributed import max_over_processes  # noqa: PLC0415

            if self.batch_size % processes:
                raise ValueError(f"RewardModelReward: batch_size {self.batch_size} does not split over "
                                 f"{processes} processes")
            size = self.batch_size // processes
            chunks = int(max_over_processes([-(-n // size)])[0])
        else:
            size = self.batch_size
            chunks = -(-n // size)
        pad = chunks * size - n
        if pad:
            # Padding rows repeat row 0 (valid lengths); their scores are dropped.
            arrays = [np.concatenate([a, np.repeat(a[:1], pad, axis=0)]) if n else
                      np.zeros((pad, *a.shape[1:]), a.dtype) + (1 if a.ndim == 1 else 0) for a in arrays]
        out = []
        for start in range(0, n + pad, size):
            chunk = [a[start:start + size] for a in arrays]
            if processes > 1:
                out.append(sh.apply_to_local_rows(lambda *a: self._score(self.params, *a), chunk, mesh=self._mesh,
                                                  strategy=self._strategy))
                continue
            chunk = [jnp.asarray(a) for a in chunk]
            if self._data_sharding is not None:
                chunk = jax.device_put(chunk, self._data_sharding)
            out.append(self._score(self.params, *chunk))
        if not out:
            return np.zeros((0,), np.float32)
        return np.asarray(np.concatenate([np.asarray(o) for o in out]))[:n].astype(np.float32)

    def _checked(self, prompts, lengths, completions, mask) -> list[np.ndarray]:
        """The host arrays, checked: prompt lengths in `[1, P]`, and every token the reward model reads
        (each prompt's first `len_b`, each completion's first `n_b`) a token id of its vocabulary (an
        id outside it would be read as NaN, or wrap around when negative). The completion tokens after
        the scored one, which a causal model ignores, are set to 0, so a padding id outside the
        vocabulary cannot turn the score into NaN."""
        if (prompts.ndim, lengths.ndim, completions.ndim) != (2, 1, 2) or mask.shape != completions.shape or \
                len({len(prompts), len(lengths), len(completions)}) != 1:
            return [prompts, lengths, completions, mask]  # sequence_scores names the shapes
        check_prompt_lengths("RewardModelReward", prompts, lengths)
        vocab = self.model.config.vocab_size
        real = mask != 0
        # Read up to each row's last 1: a mask with 0s before it (an agentic trajectory's observation
        # tokens) would otherwise be scored at prompt length + sum(mask) - 1, mid-row.
        scored = np.where(real.any(axis=1), real.shape[1] - np.argmax(real[:, ::-1], axis=1), 0)
        real_completion = np.arange(completions.shape[1])[None, :] < scored[:, None]
        real_prompt = np.arange(prompts.shape[1])[None, :] < lengths[:, None]
        for name, tokens, real in (("prompt_tokens", prompts, real_prompt),
                                   ("completion_tokens", completions, real_completion)):
            bad = real & ((tokens < 0) | (tokens >= vocab))
            if bad.any():
                row, col = (int(i) for i in np.argwhere(bad)[0])
                raise ValueError(f"RewardModelReward: {name}[{row}, {col}] = {int(tokens[row, col])} is not a token id "
                                 f"of the reward model's vocabulary [0, {vocab}) ({int(bad.sum())} such tokens); "
                                 "the reward model must read the policy's token ids")
        longest = int(np.max(lengths + scored, initial=0))
        limit = self.model.config.max_position_embeddings
        if longest > limit and not self._warned_long:
            self._warned_long = True
            warnings.warn(f"RewardModelReward: a prompt + completion of {longest} tokens is longer than the reward "
                          f"model's max_position_embeddings={limit}; it is scored whole, at positions the reward "
                          "model was not trained on (shorten prompts or max_new_tokens)", stacklevel=3)
        return [prompts, lengths, np.where(real_completion, completions, 0).astype(completions.dtype),
                real_completion.astype(mask.dtype)]

    def __call__(self, inputs: RewardInputs) -> np.ndarray:
        return self.score(inputs.prompt_tokens, inputs.prompt_lengths, inputs.completion_tokens,
                          inputs.completion_mask)
