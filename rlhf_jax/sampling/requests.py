"""The per-request generation API: `Request` in, `RequestOutput` out (continuous batching's contract).

`Sampler.generate_requests` (`rlhf_jax.sampling.continuous`) takes a sequence of `Request`s and
returns a `RequestOutput` per request, in request order; `to_sample_output` packs them as the
static call's `SampleOutput`, what the RL trainer consumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from rlhf_jax.sampling.methods import METHOD_KINDS, Categorical, SamplingMethod
from rlhf_jax.sampling.sampler_config import check_min_new_tokens

__all__ = ["Request", "RequestOutput", "to_sample_output"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request:
    """One generation request (`rlhf_jax.sampling.continuous` says how it is served).

    Attributes:
      prompt: token ids (non-empty).
      max_new_tokens: completion tokens at most (>= 1); the sample ends there with reason "length".
      method: sampling method of this request (`rlhf_jax.sampling.methods`).
      num_samples: completions of this prompt (a group; its prompt blocks are held once).
      stop_ids: ids that end a sample (EOS included here if wanted).
      stop_sequences: id sequences that end a sample when its completion ends with one.
      seed: int seed or PRNG key of this request; None: `fold_in(key(rng), request index)`.
      min_new_tokens: no sample of this request ends before this many tokens (`0 <= min_new_tokens
        <= max_new_tokens`; needs a stop id or sequence): while fewer are out its stop ids' logits
        are -inf before the method draws and its stop sequences do not match, so a sample that
        stops holds `min_new_tokens` tokens before its stop token or the last token of its stop
        sequence (`SamplingConfig.min_new_tokens`; counted from the request's first new token,
        whenever it was admitted or preempted). Log-probs stay the unmasked ones.
    """

    prompt: Sequence[int]
    max_new_tokens: int
    method: SamplingMethod = Categorical()
    num_samples: int = 1
    stop_ids: Sequence[int] = ()
    stop_sequences: Sequence[Sequence[int]] = ()
    seed: Any = None
    min_new_tokens: int = 0

    def __post_init__(self):
        prompt = np.asarray(self.prompt)
        if prompt.ndim != 1:  # a batch of prompts is one Request each; never flattened into one prompt
            raise ValueError(f"Request.prompt must be a flat sequence of token ids (one prompt per Request), got "
                             f"shape {prompt.shape}")
        if prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
            raise ValueError(f"Request.prompt must be a non-empty sequence of token ids, got {self.prompt!r}")
        object.__setattr__(self, "prompt", tuple(int(i) for i in prompt))
        for name in ("max_new_tokens", "num_samples"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Request.{name} must be an int >= 1, got {value!r}")
        if type(self.method) not in METHOD_KINDS:
            raise TypeError(f"Request.method must be one of {[m.__name__ for m in METHOD_KINDS]}, got {self.method!r}")
        object.__setattr__(self, "stop_ids", _token_ids("Request.stop_ids", self.stop_ids))
        if isinstance(self.stop_sequences, (str, bytes)) or not isinstance(self.stop_sequences, Sequence):
            raise TypeError(f"Request.stop_sequences must be a sequence of token-id sequences, got "
                            f"{self.stop_sequences!r}")
        seqs = tuple(_token_ids(f"Request.stop_sequences[{j}]", s) for j, s in enumerate(self.stop_sequences))
        if any(len(s) == 0 for s in seqs):
            raise ValueError("Request.stop_sequences: a stop sequence is empty")
        object.__setattr__(self, "stop_sequences", seqs)
        check_min_new_tokens("Request", self.min_new_tokens, self.max_new_tokens,
                             has_stops=bool(self.stop_ids or seqs), stops="stop_ids or stop_sequences")
        if isinstance(self.seed, bool) or (self.seed is not None and not isinstance(self.seed, (int, np.integer))):
            from rlhf_jax.sampling.arguments import _as_key

            try:                    # a key (typed, or raw uint32 key data) as the sampler reads it
                _as_key(self.seed)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"Request.seed must be None, an int or a single PRNG key, got {self.seed!r}") from exc


def _token_ids(name: str, ids) -> tuple[int, ...]:
    """`ids` as a tuple of ints >= 0 (token ids); a string, a scalar or a negative id is an error."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a sequence of token ids, got {ids!r}")
    out = []
    for i in ids:
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or i < 0:
            raise ValueError(f"{name} must hold token ids (ints >= 0), got {i!r} in {ids!r}")
        out.append(int(i))
    return tuple(out)


@dataclasses.dataclass
class RequestOutput:
    """Completions of one request: lists over its `num_samples` samples (numpy arrays)."""

    tokens: list[np.ndarray]
    logprobs: list[np.ndarray]
    finish_reasons: list[str]


def to_sample_output(requests: Sequence[Request], outputs: Sequence[RequestOutput], *, pad_id: int = 0,
                     max_new_tokens: int | None = None):
    """Pack per-request outputs as the static call's `SampleOutput` (numpy), rows request-major.

    Row `r` is sample `j` of request `i` in order (a request's samples contiguous, as GRPO groups);
    prompts right-padded to the longest, completions to `max_new_tokens` (default: the longest
    request's); `truncated` = finished by length. What the RL trainer consumes from `Sampler.generate`.
    """
    from rlhf_jax.sampling.state import SampleOutput

    if len(requests) != len(outputs) or not requests:
        raise ValueError(f"to_sample_output: {len(outputs)} outputs for {len(requests)} requests (one per request, "
                         "at least one)")
    for i, (req, out) in enumerate(zip(requests, outputs)):
        counts = (len(out.tokens), len(out.logprobs), len(out.finish_reasons))
        if counts != (req.num_samples,) * 3:
            raise ValueError(f"to_sample_output: output {i} has {counts} (tokens, logprobs, finish_reasons) "
                             f"entries; its request has num_samples={req.num_samples}")
        for j, (toks, lps) in enumerate(zip(out.tokens, out.logprobs)):
            if np.shape(toks) != np.shape(lps) or np.ndim(toks) != 1:
                raise ValueError(f"to_sample_output: output {i} sample {j}: tokens {np.shape(toks)} and logprobs "
                                 f"{np.shape(lps)} must be 1-d of one length")
    rows = [(req, out.tokens[j], out.logprobs[j], out.finish_reasons[j])
            for req, out in zip(requests, outputs) for j in range(req.num_samples)]
    width = max(len(r[0].prompt) for r in rows)
    cols = max(r.max_new_tokens for r in requests) if max_new_tokens is None else max_new_tokens
    n = len(rows)
    prompts = np.full((n, width), pad_id, np.int32)
    tokens = np.full((n, cols), pad_id, np.int32)
    logps = np.zeros((n, cols), np.float32)
    for r, (req, toks, lps, _) in enumerate(rows):
        if len(toks) > cols:
            raise ValueError(f"to_sample_output: row {r} has {len(toks)} tokens > max_new_tokens={cols}")
        prompts[r, : len(req.prompt)] = req.prompt
        tokens[r, : len(toks)] = toks
        logps[r, : len(lps)] = lps
    lengths = np.asarray([len(r[1]) for r in rows], np.int32)
    return SampleOutput(
        prompt_tokens=prompts, prompt_lengths=np.asarray([len(r[0].prompt) for r in rows], np.int32),
        completion_tokens=tokens, completion_mask=np.arange(cols)[None, :] < lengths[:, None], logprobs=logps,
        lengths=lengths, truncated=np.asarray([r[3] == "length" for r in rows]),
    )
