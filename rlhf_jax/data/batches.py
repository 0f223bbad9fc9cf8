"""Batch schemas: the contract between the data pipeline and the jitted training steps.

Every batch is a dict of NumPy arrays of fixed shapes (a prompt batch adds a dict of Python lists).
`B` is the per-host batch size, `T` the row length (`seq_len`), `S` the segment slots per row:
`max_segments` when packed, 1 when not. `batch_spec(kind, ...)` gives the shapes and dtypes as
`jax.ShapeDtypeStruct`s, for `jax.eval_shape` and ahead-of-time compilation.

Token rows (one per track; the preference kind has a chosen and a rejected track, prefixed
`chosen_` / `rejected_`):

  tokens       int32   [B, T]  token ids, right-padded with the tokenizer's pad id
  positions    int32   [B, T]  position within the segment, restarting at 0 per segment; 0 in padding
  segment_ids  int32   [B, T]  1..k for the k examples packed into the row, 0 = padding
  loss_mask    float32 [B, T]  1.0 on tokens trained on (completion / assistant tokens and their EOS);
                               never 1.0 on the first token of a segment

Kinds:

- "sft": the token row, and `example_mask` bool [B, S] (segment s+1 of row b holds an example).
- "preference" (reward model, DPO family): `chosen_*` and `rejected_*` token rows, `margin` float32
  [B, S] (0 where the data has none) and `example_mask` bool [B, S]. Pair s+1 of row b is segment
  s+1 of `chosen_*[b]` together with segment s+1 of `rejected_*[b]`: packing places both sequences of
  a pair in the same row and slot of their two arrays. Unpacked batches are the case S = 1.
- "unpaired" (KTO; never packed): the token row, `label` bool [B] (True = desirable),
  `example_mask` bool [B], and `kl_*` token rows: row b is the prompt of its example followed by the
  completion of the next filled row's example (cyclically; `kl_partners` skips rows holding the
  same example, as a batch crossing an epoch boundary can), cut to T, as KTO's reference point
  needs mismatched pairs (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
  Optimization").
- "prompt" (online RL): `prompt_tokens` int32 [B, T] right-padded, `prompt_lengths` int32 [B],
  `example_mask` bool [B], and `columns`: a dict of Python lists of length B holding the dataset's
  extra columns (e.g. "answer") for the reward functions (None in padding rows). Only the arrays go
  to the device.

Padding rows (the last batch of a finite iteration) have `example_mask` False, segment ids 0 and a
zero loss mask, so every masked sum ignores them.

Reading per-example log-probs from a (packed) batch inside a step, with `S` slots:

    out = model.forward(params, tokens, positions, segment_ids)
    lp = token_logprobs(out.logits[:, :-1], tokens[:, 1:])       # lp[:, t] = log p(tokens[t+1] | ...)
    w = loss_mask[:, 1:]                                         # 1.0 on trained targets
    seq_logps = segment_sums(lp * w, segment_ids[:, 1:], num_segments=S)   # [B, S] summed log-probs
    seq_tokens = segment_sums(w, segment_ids[:, 1:], num_segments=S)       # [B, S] completion lengths

This is exact because a target t+1 with weight 1 is never the first token of its segment, so token
t lies in the same segment and attention never crosses segments. For preference batches, run it on
both tracks and pair `seq_logps` slot by slot (weights `example_mask`); for a reward model, read
the hidden state at `segment_last_index(segment_ids, num_segments=S)` (the last token of each
segment; for S = 1 that is the last non-pad token).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.dataset import TokenizedDataset
from rlhf_jax.data.formats import KINDS
from rlhf_jax.models.heads import last_token_index

__all__ = ["TOKEN_FIELDS", "batch_spec", "collate", "kl_partners", "segment_sums", "segment_last_index"]

TOKEN_FIELDS = ("tokens", "positions", "segment_ids", "loss_mask")
_TRACKS = {"sft": ("tokens",), "preference": ("chosen_tokens", "rejected_tokens"), "unpaired": ("tokens",),
           "prompt": ("prompt_tokens",)}  # the sequences of an example that `seq_len` bounds
_TOKEN_DTYPES = {"tokens": np.int32, "positions": np.int32, "segment_ids": np.int32, "loss_mask": np.float32}


def batch_spec(
    kind: str, *, batch_size: int, seq_len: int, num_segments: int = 1
) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of the arrays of a batch of `kind` (the `columns` of prompt batches excluded).

    Args:
      kind: "sft", "preference", "unpaired" or "prompt".
      batch_size: B (per host).
      seq_len: T.
      num_segments: S (1 when not packed; unpaired and prompt batches are never packed).

    Returns:
      name -> `jax.ShapeDtypeStruct`, exactly the arrays `collate` returns.
    """
    if kind not in KINDS:
        raise ValueError(f"batch_spec: kind must be one of {KINDS}, got {kind!r}")
    if kind in ("unpaired", "prompt") and num_segments != 1:
        raise ValueError(
            f"batch_spec: {kind} batches are never packed; num_segments must be 1, got {num_segments}"
        )
    B, T, S = batch_size, seq_len, num_segments
    row = lambda prefix="": {
        prefix + f: jax.ShapeDtypeStruct((B, T), _TOKEN_DTYPES[f]) for f in TOKEN_FIELDS
    }  # noqa: E731
    if kind == "sft":
        return {**row(), "example_mask": jax.ShapeDtypeStruct((B, S), np.bool_)}
    if kind == "preference":
        return {
            **row("chosen_"),
            **row("rejected_"),
            "margin": jax.ShapeDtypeStruct((B, S), np.float32),
            "example_mask": jax.ShapeDtypeStruct((B, S), np.bool_),
        }
    if kind == "unpaired":
        return {
            **row(),
            "label": jax.ShapeDtypeStruct((B,), np.bool_),
            "example_mask": jax.ShapeDtypeStruct((B,), np.bool_),
            **row("kl_"),
        }
    return {
        "prompt_tokens": jax.ShapeDtypeStruct((B, T), np.int32),
        "prompt_lengths": jax.ShapeDtypeStruct((B,), np.int32),
        "example_mask": jax.ShapeDtypeStruct((B,), np.bool_),
    }


def _token_rows(
    seqs: list[list[tuple[np.ndarray, np.ndarray | None]]], seq_len: int, pad_id: int, prefix: str = ""
) -> dict:
    """Write rows of segments (ids, trained mask) into the four token arrays."""
    B = len(seqs)
    tokens = np.full((B, seq_len), pad_id, np.int32)
    positions = np.zeros((B, seq_len), np.int32)
    segment_ids = np.zeros((B, seq_len), np.int32)
    loss_mask = np.zeros((B, seq_len), np.float32)
    for b, row in enumerate(seqs):
        at = 0
        for k, (ids, mask) in enumerate(row):
            n = len(ids)
            tokens[b, at : at + n] = ids
            positions[b, at : at + n] = np.arange(n)
            segment_ids[b, at : at + n] = k + 1
            if mask is not None:
                loss_mask[b, at + 1 : at + n] = mask[1:]  # a segment's first token is never a target
            at += n
    return {
        prefix + "tokens": tokens,
        prefix + "positions": positions,
        prefix + "segment_ids": segment_ids,
        prefix + "loss_mask": loss_mask,
    }


def _example_mask(rows: Sequence[Sequence[int]], num_segments: int) -> np.ndarray:
    mask = np.zeros((len(rows), num_segments), bool)
    for b, row in enumerate(rows):
        mask[b, : len(row)] = True
    return mask


def kl_partners(rows: Sequence[Sequence[int]]) -> list[int | None]:
    """KTO's mismatched pairs: for each row, the example whose completion its KL row takes.

    That is the example of the next filled row (cyclically) that holds another example, so an
    example that appears twice in a batch (a batch that crosses an epoch boundary) is not paired
    with its own completion; only a batch of one distinct example pairs it with itself. None for
    empty rows.
    """
    filled = [b for b, row in enumerate(rows) if row]
    items = [rows[b][0] for b in filled]
    out: list[int | None] = [None] * len(rows)
    for k, b in enumerate(filled):
        following = (items[(k + j) % len(items)] for j in range(1, len(items)))
        out[b] = next((i for i in following if i != items[k]), items[k])
    return out


def _kl_rows(dataset: TokenizedDataset, rows: Sequence[Sequence[int]], seq_len: int,
             partners: Sequence[int | None] | None = None) -> list[list[tuple]]:
    """KTO mismatched pairs: row b = prompt of its example + completion of `partners[b]` (default
    `kl_partners(rows)`), cut to seq_len; empty rows stay empty."""
    tokens, mask, plen = (
        dataset.arrays["tokens"],
        dataset.arrays["loss_mask"],
        dataset.arrays["prompt_length"],
    )
    partners = kl_partners(rows) if partners is None else partners
    if len(partners) != len(rows):
        raise ValueError(f"collate: partners has {len(partners)} entries for {len(rows)} rows")
    out = []
    for row, other in zip(rows, partners):
        if not row:
            out.append([])
            continue
        item = row[0]
        p, q = int(plen[item]), int(plen[other])
        ids = np.concatenate([tokens[item][:p], tokens[other][q:]])[:seq_len]
        m = np.concatenate([np.zeros(p, bool), mask[other][q:]])[:seq_len]
        out.append([(ids, m)])
    return out


def _check_rows(dataset: TokenizedDataset, rows: Sequence[Sequence[int]], seq_len: int, num_segments: int) -> None:
    """Every index names an example, and every row's examples fit `seq_len` on every track."""
    if not isinstance(num_segments, int) or num_segments < 1:
        raise ValueError(f"collate: num_segments must be a positive int, got {num_segments!r}")
    n = len(dataset)
    tracks = [dataset.arrays[name] for name in _TRACKS[dataset.kind]]
    for b, row in enumerate(rows):
        bad = [i for i in row if not 0 <= i < n]
        if bad:
            raise ValueError(f"collate: rows[{b}] holds example index {bad[0]}, but {dataset.source} has {n} examples")
        if len(row) > num_segments:
            raise ValueError(f"collate: rows[{b}] holds {len(row)} examples, more than num_segments={num_segments}")
        used = max(sum(len(track[i]) for i in row) for track in tracks)
        if used > seq_len:
            raise ValueError(
                f"collate: rows[{b}] (examples {list(row)}) needs {used} tokens, more than seq_len={seq_len}"
            )


def collate(
    dataset: TokenizedDataset, rows: Sequence[Sequence[int]], *, seq_len: int, num_segments: int = 1,
    partners: Sequence[int | None] | None = None,
) -> dict:
    """Build one batch: row b holds the examples `rows[b]` (indices into `dataset`) as segments 1, 2, ...

    Args:
      dataset: the tokenized examples.
      rows: B lists of example indices (empty lists are padding rows).
      seq_len: T; every row's examples must fit (the packer guarantees it).
      num_segments: S, the segment slots of per-example arrays (>= the longest row).
      partners: unpaired kind: for each row, the example whose completion its KL row takes
        (default `kl_partners(rows)`; a process collating its block of a global batch passes its
        block of the global batch's `kl_partners`).

    Returns:
      The batch dict of `batch_spec(dataset.kind, batch_size=len(rows), seq_len=seq_len,
      num_segments=num_segments)` (plus `columns` for prompt batches).
    """
    kind, arrays, pad = dataset.kind, dataset.arrays, dataset.pad_id
    _check_rows(dataset, rows, seq_len, num_segments)
    if kind == "sft":
        segs = [[(arrays["tokens"][i], arrays["loss_mask"][i]) for i in row] for row in rows]
        return {**_token_rows(segs, seq_len, pad), "example_mask": _example_mask(rows, num_segments)}
    if kind == "preference":
        batch = {}
        for track in ("chosen_", "rejected_"):
            segs = [
                [(arrays[track + "tokens"][i], arrays[track + "loss_mask"][i]) for i in row] for row in rows
            ]
            batch.update(_token_rows(segs, seq_len, pad, track))
        margin = np.zeros((len(rows), num_segments), np.float32)
        for b, row in enumerate(rows):
            margin[b, : len(row)] = arrays["margin"][list(row)]
        return {**batch, "margin": margin, "example_mask": _example_mask(rows, num_segments)}
    if num_segments != 1:
        raise ValueError(
            f"collate: {kind} batches are never packed; num_segments must be 1, got {num_segments}"
        )
    valid = _example_mask(rows, 1)[:, 0]
    if kind == "unpaired":
        segs = [[(arrays["tokens"][i], arrays["loss_mask"][i]) for i in row] for row in rows]
        label = np.array([bool(arrays["label"][row[0]]) if row else False for row in rows], bool)
        return {
            **_token_rows(segs, seq_len, pad),
            "label": label,
            "example_mask": valid,
            **_token_rows(_kl_rows(dataset, rows, seq_len, partners), seq_len, pad, "kl_"),
        }
    prompts = arrays["prompt_tokens"]
    tokens = np.full((len(rows), seq_len), pad, np.int32)
    lengths = np.zeros(len(rows), np.int32)
    for b, row in enumerate(rows):
        if row:
            tokens[b, : len(prompts[row[0]])] = prompts[row[0]]
            lengths[b] = len(prompts[row[0]])
    columns = {
        name: [values[row[0]] if row else None for row in rows] for name, values in dataset.columns.items()
    }
    return {"prompt_tokens": tokens, "prompt_lengths": lengths, "example_mask": valid, "columns": columns}


def segment_sums(values: jax.Array, segment_ids: jax.Array, *, num_segments: int) -> jax.Array:
    """Per-segment sums of a packed row: `out[b, s] = sum_t values[b, t] * [segment_ids[b, t] == s + 1]`.

    The one implementation: the DPO-family and reward-model steps sum their packed sequences with it.

    Args:
      values: [B, T] (e.g. masked token log-probs).
      segment_ids: int [B, T], 0 = padding (never summed).
      num_segments: S, the most segments a row holds (1 when unpacked).

    Returns:
      float32 [B, S].

    Example:
      >>> segment_sums(jnp.array([[1., 2., 4., 8.]]), jnp.array([[1, 1, 2, 0]]), num_segments=2)
      Array([[3., 4.]], dtype=float32)
    """
    one_hot = jax.nn.one_hot(jnp.asarray(segment_ids) - 1, num_segments, dtype=jnp.float32)
    return jnp.einsum("bt,bts->bs", jnp.asarray(values).astype(jnp.float32), one_hot)


def segment_last_index(segment_ids: jax.Array, *, num_segments: int) -> jax.Array:
    """Index of the last token of each segment: `out[b, s] = max{t : segment_ids[b, t] == s + 1}` (0 if none).

    Args:
      segment_ids: int [B, T].
      num_segments: S.

    Returns:
      int32 [B, S]; for unpacked right-padded rows (S = 1), the last non-pad token.
    """
    segment_ids = jnp.asarray(segment_ids)
    b, t = segment_ids.shape
    member = segment_ids[:, None, :] == jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)[None, :, None]
    return last_token_index(member.reshape(b * num_segments, t)).reshape(b, num_segments)
