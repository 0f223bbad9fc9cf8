"""Hugging Face checkpoints <-> (`ModelConfig`, params), with numpy and safetensors only (no torch).

A Hugging Face directory holds `config.json` and the weights in `model.safetensors`, or in several
`*.safetensors` shards listed by `model.safetensors.index.json`. `load_hf` reads such a directory
into our config and parameter tree; `save_hf` writes one that
`transformers.AutoModelForCausalLM.from_pretrained` (or `AutoModelForSequenceClassification` for
a scalar head) loads.

Layouts. Hugging Face stores each `nn.Linear` weight as [out, in]; our kernels are einsum-shaped
[in, ...out] (`q_proj` [E, H, D], `o_proj` [H, D, E], `gate_proj` [E, F], `lm_head` [E, V]), and
every per-layer parameter is stacked on a leading `layers` axis. The mapping is a transpose and a
reshape, so a round trip is exact bit for bit, in float32 and bfloat16 alike.

Supported `model_type`s: llama (incl. Llama 3 `rope_type: "llama3"`), mistral (sliding window),
qwen2 (q/k/v bias, sliding window when every layer uses it), qwen3 (q/k RMSNorm, explicit
`head_dim`). `*ForSequenceClassification` checkpoints with one label (`score.weight` [1, E]) load
as the scalar head (`CausalLM(config, head="scalar")`); their params carry `score` instead of
`lm_head`. Old Llama checkpoints that still store `rotary_emb.inv_freq` buffers load (the buffers
are recomputed from the config, never read).

The config half (`config_from_hf`, `config_to_hf`, `HFCheckpointError`, the token ids of an export)
lives in `rlhf_jax.models.hf_config`; this module re-exports it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.hf_config import (  # noqa: F401 -- re-exported: the public API of this module
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    SUPPORTED_MODEL_TYPES,
    HFCheckpointError,
    as_ids,
    check_apart,
    check_replaceable,
    config_from_dict,
    config_from_hf,
    config_to_hf,
    export_token_ids,
    open_safetensors,
    read_json,
    write_json,
)
from rlhf_jax.models.transformer import CausalLM, Head, check_param_shapes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype names; floating ones may be converted to the requested parameter dtype.
_FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}
_DTYPE_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# Buffers that old checkpoints stored and that we recompute from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# --------------------------------------------------------------------------------- tensor names


@dataclasses.dataclass(frozen=True)
class _TensorSpec:
    """One Hugging Face tensor and the parameter (or the layer slice of one) it fills.

    `transpose`: HF stores the 2-D [out, in] matrix whose transpose, reshaped, is our kernel.
    """

    hf_name: str
    path: tuple[str, ...]
    layer: int | None
    hf_shape: tuple[int, ...]
    transpose: bool

    def read_into(self, array: np.ndarray, out: np.ndarray) -> None:
        """Write the HF tensor `array` into `out` (our layout, C-contiguous) with a single copy."""
        if self.transpose:
            out.reshape(array.shape[::-1])[...] = array.T
        else:
            out.reshape(array.shape)[...] = array

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        if self.transpose:
            return np.ascontiguousarray(array.reshape(self.hf_shape[::-1]).T)
        return np.ascontiguousarray(array.reshape(self.hf_shape))


def _tensor_specs(config: ModelConfig, head: Head) -> list[_TensorSpec]:
    """Every tensor of a checkpoint of `config`, in Hugging Face's order."""
    c = config
    e, h, k, d, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    specs = [_TensorSpec("model.embed_tokens.weight", ("embed",), None, (c.vocab_size, e), False)]
    per_layer = [
        ("input_layernorm.weight", ("input_norm", "scale"), (e,), False),
        ("self_attn.q_proj.weight", ("attn", "q_proj"), (h * d, e), True),
        ("self_attn.k_proj.weight", ("attn", "k_proj"), (k * d, e), True),
        ("self_attn.v_proj.weight", ("attn", "v_proj"), (k * d, e), True),
        ("self_attn.o_proj.weight", ("attn", "o_proj"), (e, h * d), True),
    ]
    if c.attention_bias:
        per_layer += [
            ("self_attn.q_proj.bias", ("attn", "q_bias"), (h * d,), False),
            ("self_attn.k_proj.bias", ("attn", "k_bias"), (k * d,), False),
            ("self_attn.v_proj.bias", ("attn", "v_bias"), (k * d,), False),
        ]
    if c.qk_norm:
        per_layer += [
            ("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), (d,), False),
            ("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), (d,), False),
        ]
    per_layer += [
        ("post_attention_layernorm.weight", ("post_attn_norm", "scale"), (e,), False),
        ("mlp.gate_proj.weight", ("mlp", "gate_proj"), (f, e), True),
        ("mlp.up_proj.weight", ("mlp", "up_proj"), (f, e), True),
        ("mlp.down_proj.weight", ("mlp", "down_proj"), (e, f), True),
    ]
    for i in range(c.num_layers):
        for name, path, shape, transpose in per_layer:
            specs.append(_TensorSpec(f"model.layers.{i}.{name}", ("layers",) + path, i, shape, transpose))
    specs.append(_TensorSpec("model.norm.weight", ("final_norm", "scale"), None, (e,), False))
    if head == "scalar":
        specs.append(_TensorSpec("score.weight", ("score",), None, (1, e), False))
    elif not c.tie_word_embeddings:
        specs.append(_TensorSpec("lm_head.weight", ("lm_head",), None, (c.vocab_size, e), True))
    return specs


def _checked_specs(config: ModelConfig, head: Head) -> tuple[list[_TensorSpec], dict]:
    """The specs and the flat abstract params {path: ShapeDtypeStruct}; they must cover each other."""
    abstract = _flatten(CausalLM(config, head=head).abstract_params())
    specs = _tensor_specs(config, head)
    covered = {s.path for s in specs}
    if covered != set(abstract):
        raise AssertionError(
            f"hf.py maps {sorted(covered ^ set(abstract))} inconsistently with the model's parameters"
        )
    return specs, abstract


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def _unflatten(flat: Mapping) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


# ------------------------------------------------------------------------------------------ load


def load_hf(path: str | os.PathLike, *, dtype: str | None = None, shardings=None) -> tuple[ModelConfig, dict]:
    """Read a local Hugging Face checkpoint directory into `(ModelConfig, params)`.

    Every tensor's name, shape and dtype is checked against the config from the safetensors
    headers before any data is read, so a bad checkpoint raises and nothing half-loaded is returned.
    Each parameter is assembled on the host (layers stacked) and then put on device, one at a time.

    Args:
      path: a directory with config.json and model.safetensors, or shards listed by
        model.safetensors.index.json (any *.safetensors files when there is no index).
      dtype: parameter dtype, "float32" or "bfloat16" (any floating checkpoint converts). None keeps
        the checkpoint's dtype: every tensor must then have the dtype config.json declares (float16
        is upcast to float32 exactly).
      shardings: optional tree like the params of `jax.sharding.Sharding`s to place each parameter
        directly (e.g. from `rlhf_jax.sharding`); default: the default device.
    Returns:
      (config, params): `config.param_dtype` and `config.dtype` equal the loaded dtype; `params` is
      the nested dict of `CausalLM(config, head=...).init`, with `score` instead of `lm_head` for a
      `*ForSequenceClassification` checkpoint (load it with `head="scalar"`). Such a checkpoint whose
      pad_token_id is an EOS id gets a warning (`warn_pad_pooling`): transformers scores it elsewhere.
    Raises:
      FileNotFoundError: the directory, config.json or a shard is missing.
      HFCheckpointError: an unsupported config, or missing, extra, mis-shaped or wrongly typed
        tensors, naming the file and the tensor.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"load_hf: {root} is not a directory")
    config_file = root / CONFIG_FILE
    raw = read_json(config_file)
    config = config_from_dict(raw, str(config_file))
    if dtype is not None and dtype not in ("float32", "bfloat16"):
        raise ValueError(f"load_hf: dtype must be 'float32', 'bfloat16' or None, got {dtype!r}")
    target = dtype or config.param_dtype
    config = config.replace(param_dtype=target, dtype=target)

    with _Checkpoint(root) as ckpt:
        head = _head_of(raw, ckpt.names, config_file)
        specs, abstract = _checked_specs(config, head)
        declared = None if dtype is not None else _declared_dtype(raw, specs[0], ckpt)
        ckpt.check(specs, declared, tied=config.tie_word_embeddings and head == "lm")
        flat_shardings = None if shardings is None else _flat_shardings(shardings, abstract)
        by_path: dict[tuple, list[_TensorSpec]] = {}
        for spec in specs:
            by_path.setdefault(spec.path, []).append(spec)
        flat = {}
        for leaf_path, leaf_specs in by_path.items():
            shape = abstract[leaf_path].shape
            place = None if flat_shardings is None else flat_shardings[leaf_path]
            if place is not None and not place.is_fully_addressable:
                flat[leaf_path] = _load_sliced(ckpt, leaf_specs, shape, place, jnp.dtype(target))
                continue
            host = np.empty(shape, jnp.dtype(target))
            for spec in leaf_specs:
                spec.read_into(ckpt.read(spec.hf_name), host if spec.layer is None else host[spec.layer])
            flat[leaf_path] = jax.device_put(host, place)
        if config.tie_word_embeddings and head == "lm" and "lm_head.weight" in ckpt.names:
            _check_tied_copy(ckpt, flat[("embed",)], specs[0])
    if head == "scalar":
        warn_pad_pooling(config.pad_token_id, config.eos_token_id, f"load_hf: {config_file}",
                         "drop a trailing EOS from the mask to score as transformers does")
    return config, _unflatten(flat)


def warn_pad_pooling(pad, eos, where: str, advice: str) -> None:
    """Warn when a scalar head's pad id is an EOS id: transformers' `*ForSequenceClassification` scores a
    row at its last token that is not `pad_token_id` (before a trailing EOS), while `heads.gather_last`
    reads the last real token of the mask (the EOS), so the two score EOS-terminated rows differently."""
    if pad is not None and pad in as_ids(eos):
        warnings.warn(f"{where}: pad_token_id {pad} is also an EOS id; transformers' *ForSequenceClassification "
                      "scores a row at its last token that is not the pad id, i.e. before a trailing EOS, while "
                      f"rlhf_jax scores at the last real token of the mask (the EOS): {advice}", stacklevel=3)


def _head_of(raw: dict, names, config_file: Path) -> Head:
    archs = raw.get("architectures") or []
    scalar = any(a.endswith("ForSequenceClassification") for a in archs) or (
        not archs and "score.weight" in names
    )
    if scalar:
        labels = raw.get("id2label") or {"0": "LABEL_0"}
        num_labels = raw.get("num_labels", len(labels))
        if num_labels != 1:
            raise HFCheckpointError(
                f"{config_file}: a scalar head needs num_labels == 1 (score.weight [1, E]), got {num_labels!r}"
            )
    return "scalar" if scalar else "lm"


def _declared_dtype(raw: dict, first: _TensorSpec, ckpt: "_Checkpoint") -> str:
    """The safetensors dtype every tensor must have when loading without a dtype override."""
    name = raw.get("dtype") or raw.get("torch_dtype")
    if name is None:
        return ckpt.dtype_of(first.hf_name)
    return _DTYPE_NAMES[name]


def _split_groups(ours: Sequence[int], hf: Sequence[int]) -> list[list[int]] | None:
    """Our axes grouped by the HF axis (in our axis order) each group splits, or None when not a pure split."""
    groups, at = [], 0
    for size in hf:
        group = [at]
        at += 1
        while at <= len(ours) and math.prod(ours[d] for d in group) < size:
            if at == len(ours):
                return None
            group.append(at)
            at += 1
        if at > len(ours) or math.prod(ours[d] for d in group) != size:
            return None
        groups.append(group)
    return groups if at == len(ours) else None


def _read_block(ckpt: "_Checkpoint", spec: _TensorSpec, ranges: Sequence[range], ours: Sequence[int]) -> np.ndarray:
    """The block `ranges` (one range per axis of our layout `ours`) of one HF tensor, reading only its
    part of the file when the block is a run of whole sub-blocks along each HF axis (the shardings'
    case), else the tensor's whole rows along the axes it cannot narrow."""
    hf = tuple(spec.hf_shape[::-1]) if spec.transpose else tuple(spec.hf_shape)
    groups = _split_groups(tuple(ours), hf)
    if groups is None:  # not a pure split of the HF axes: read it all
        full = np.empty(tuple(ours), ckpt.read(spec.hf_name).dtype)
        spec.read_into(ckpt.read(spec.hf_name), full)
        return full[tuple(slice(r.start, r.stop) for r in ranges)]
    wanted, shape, exact = [], [], []
    for size, dims in zip(hf, groups):
        inner = math.prod(ours[d] for d in dims[1:])
        whole_inner = all(len(ranges[d]) == ours[d] for d in dims[1:])
        lo, hi = (ranges[dims[0]].start, ranges[dims[0]].stop) if whole_inner else (0, ours[dims[0]])
        wanted.append(slice(lo * inner, hi * inner))
        shape += [hi - lo, *[ours[d] for d in dims[1:]]]
        exact += [slice(ranges[dims[0]].start - lo, ranges[dims[0]].stop - lo),
                  *[slice(ranges[d].start, ranges[d].stop) for d in dims[1:]]]
    piece = ckpt.read_slice(spec.hf_name, tuple(wanted[::-1]) if spec.transpose else tuple(wanted))
    piece = piece.T if spec.transpose else piece
    return piece.reshape(shape)[tuple(exact)]


def _load_sliced(ckpt: "_Checkpoint", leaf_specs: list[_TensorSpec], shape, sharding, dtype) -> jax.Array:
    """One parameter as a global array of which this process reads only the blocks its devices hold."""
    blocks: dict[tuple, np.ndarray] = {}
    by_layer = {s.layer: s for s in leaf_specs}

    def block(index) -> np.ndarray:
        ranges = [range(*sl.indices(n)) for sl, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)),
                                                          shape)]
        key = tuple((r.start, r.stop) for r in ranges)
        if key not in blocks:
            out = np.empty([len(r) for r in ranges], dtype)
            if leaf_specs[0].layer is None:
                out[...] = _read_block(ckpt, leaf_specs[0], ranges, shape)
            else:
                for j, layer in enumerate(ranges[0]):
                    out[j] = _read_block(ckpt, by_layer[layer], ranges[1:], shape[1:])
            blocks[key] = out
        return blocks[key]

    return jax.make_array_from_callback(tuple(shape), sharding, block)


def _check_tied_copy(ckpt: "_Checkpoint", embed, embed_spec: _TensorSpec) -> None:
    """A tied checkpoint may still store lm_head.weight; it must then equal the embedding."""
    if not embed.is_fully_addressable:  # compare the blocks this process holds
        spec = dataclasses.replace(embed_spec, hf_name="lm_head.weight")
        for shard in embed.addressable_shards:
            ranges = [range(*sl.indices(n)) for sl, n in zip(shard.index, embed.shape)]
            if not np.array_equal(_read_block(ckpt, spec, ranges, embed.shape).astype(np.float32),
                                  np.asarray(shard.data).astype(np.float32)):
                raise HFCheckpointError(
                    f"{ckpt.file_of('lm_head.weight')}: tensor 'lm_head.weight' differs from "
                    "'model.embed_tokens.weight' although tie_word_embeddings is true")
        return
    lm_head = ckpt.read("lm_head.weight")
    if not np.array_equal(lm_head.astype(np.float32), np.asarray(embed).astype(np.float32)):
        raise HFCheckpointError(
            f"{ckpt.file_of('lm_head.weight')}: tensor 'lm_head.weight' differs from "
            "'model.embed_tokens.weight' although tie_word_embeddings is true"
        )


def _flat_shardings(shardings, abstract: dict) -> dict:
    flat = _flatten(shardings)
    if set(flat) != set(abstract):
        diff = sorted("/".join(p) for p in set(flat) ^ set(abstract))
        raise ValueError(f"load_hf: shardings tree does not match the parameters at {diff}")
    return flat


class _Checkpoint:
    """The safetensors files of a directory, opened lazily for reading headers and tensors."""

    def __init__(self, root: Path):
        self.root = root
        self.source = str(root)  # what a missing tensor is reported against (set by _index)
        self._handles: dict[str, Any] = {}
        try:
            self._index(root)
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _index(self, root: Path) -> None:
        """Map every tensor name to its file; the index and the files' headers must agree."""
        index_file = root / INDEX_FILE
        if index_file.exists():
            self.source = str(index_file)
            weight_map = read_json(index_file).get("weight_map")
            if not isinstance(weight_map, Mapping):
                raise HFCheckpointError(f"{index_file}: no 'weight_map' mapping tensor names to files")
            self._file_of = dict(weight_map)
            for name, file in sorted(self._file_of.items()):
                inside = isinstance(file, str) and file.endswith(".safetensors") and not os.path.isabs(file) and (
                    ".." not in Path(file).parts)
                if not inside:
                    raise HFCheckpointError(f"{index_file}: weight_map gives tensor {name!r} the file {file!r}, not "
                                            "the name of a .safetensors file in this directory")
            for file in sorted(set(self._file_of.values())):
                if not (root / file).exists():
                    raise FileNotFoundError(f"load_hf: shard {root / file} (listed in {index_file}) is missing")
        else:
            files = sorted(p.name for p in root.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"load_hf: no {SINGLE_FILE} or {INDEX_FILE} in {root}")
            self.source = str(root / files[0]) if len(files) == 1 else f"{root}/*.safetensors"
            self._file_of = {}
            for file in files:
                for name in self._open(file).keys():
                    if name in self._file_of:
                        raise HFCheckpointError(
                            f"{root / file}: tensor {name!r} is also in {root / self._file_of[name]}"
                        )
                    self._file_of[name] = file
        for file in sorted(set(self._file_of.values())):
            handle = self._open(file)
            stored = set(handle.keys())
            for name in sorted(stored):
                if self._file_of.get(name) != file:
                    raise HFCheckpointError(
                        f"{root / file}: unexpected tensor {name!r} (not listed for this file in {INDEX_FILE})"
                    )
            for name, listed in sorted(self._file_of.items()):
                if listed == file and name not in stored:
                    raise HFCheckpointError(
                        f"{root / file}: missing tensor {name!r} (listed in {self.source})"
                    )
        self.names = {n for n in self._file_of if not n.endswith(_IGNORED_SUFFIXES)}

    def _open(self, file: str):
        if file not in self._handles:
            self._handles[file] = open_safetensors(self.root / file)
        return self._handles[file]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def file_of(self, name: str) -> Path:
        return self.root / self._file_of[name]

    def dtype_of(self, name: str) -> str:
        return self._handles[self._file_of[name]].get_slice(name).get_dtype()

    def check(self, specs: list[_TensorSpec], declared: str | None, *, tied: bool) -> None:
        """Names, shapes and dtypes against `specs`, from the headers alone."""
        expected = {s.hf_name for s in specs}
        for name in sorted(self.names - expected):
            if tied and name == "lm_head.weight":
                continue
            raise HFCheckpointError(f"{self.file_of(name)}: unexpected tensor {name!r} for this config")
        for spec in specs:
            if spec.hf_name not in self.names:
                raise HFCheckpointError(f"{self.source}: missing tensor {spec.hf_name!r}")
        checked = list(specs)
        if tied and "lm_head.weight" in self.names:
            checked.append(dataclasses.replace(specs[0], hf_name="lm_head.weight"))
        for spec in checked:
            piece = self._handles[self._file_of[spec.hf_name]].get_slice(spec.hf_name)
            shape, kind = tuple(piece.get_shape()), piece.get_dtype()
            where = f"{self.file_of(spec.hf_name)}: tensor {spec.hf_name!r}"
            if shape != spec.hf_shape:
                raise HFCheckpointError(f"{where} has shape {list(shape)}, expected {list(spec.hf_shape)}")
            if kind not in _FLOAT_DTYPES:
                raise HFCheckpointError(f"{where} has dtype {kind}, expected a floating dtype")
            if declared is not None and kind != declared:
                raise HFCheckpointError(
                    f"{where} has dtype {kind}, but the checkpoint declares {declared} "
                    "(pass dtype= to convert)"
                )

    def read(self, name: str) -> np.ndarray:
        return self._handles[self._file_of[name]].get_tensor(name)

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Only `index` of a tensor (safetensors reads just those bytes)."""
        return self._handles[self._file_of[name]].get_slice(name)[index]


# ------------------------------------------------------------------------------------------ save


def save_hf(
    path: str | os.PathLike,
    config: ModelConfig,
    params: Mapping,
    tokenizer=None,
    *,
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
) -> Path:
    """Write `(config, params)` as a Hugging Face checkpoint directory, atomically.

    Tensors keep the dtype of `params` (all leaves must share one), which config.json declares.
    Above `max_shard_size` bytes the weights are split into `model-0000i-of-0000n.safetensors`
    shards with a `model.safetensors.index.json`, as transformers writes them. The directory is
    assembled under a temporary name beside `path` and renamed into place, so `path` is either
    absent, the old directory (`overwrite=True`) or the complete new one, never half-written.

    Token ids: config.json's BOS/EOS/pad ids are the model config's, each unset one taken from
    `tokenizer`; a causal LM also gets `generation_config.json` with those ids, its EOS being every
    id the model config or the tokenizer stops at (as instruct models ship it), so that
    `generate` stops at EOS. A reward model without a pad id, or a language model without an EOS
    id, gets a warning: transformers cannot batch the one, nor stop the other's generation.

    Args:
      path: the directory to create.
      config: the model configuration (`config_to_hf` must be able to express it).
      params: the nested parameter dict of `CausalLM(config, head=...)`; one with `score` is written
        as `*ForSequenceClassification` with one label.
      tokenizer: optional transformers tokenizer (`save_pretrained(directory)`, `*_token_id`).
      max_shard_size: bytes per shard, an int or a string like "2GB" (10^9) or "500MiB" (2^20).
      overwrite: replace an existing `path` that holds an earlier export (`check_replaceable`); otherwise an
        existing `path` is an error.
    Returns:
      The directory written.
    Raises:
      FileExistsError: `path` exists and `overwrite` is false, or it holds something other than an export.
      HFCheckpointError: params that do not match the config, naming the parameter.
    """
    target = Path(path)
    limit = parse_size(max_shard_size)
    check_replaceable(target, overwrite=overwrite, caller="save_hf")
    head: Head = "scalar" if "score" in params else "lm"
    specs, abstract = _checked_specs(config, head)
    flat = _check_params(params, abstract)
    param_dtype = _common_dtype(flat)
    ids, generation = export_token_ids(config, tokenizer)
    if head == "scalar":
        warn_pad_pooling(ids["pad_token_id"], generation.get("eos_token_id"), f"save_hf: {target}",
                         "give the model config a pad_token_id that is not an EOS id")
    _warn_missing_id(ids, head, target)
    hf_config = config_to_hf(config.replace(param_dtype=param_dtype, **ids), head=head)
    itemsize = jnp.dtype(param_dtype).itemsize
    shards = _plan_shards(specs, itemsize, limit)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        write_json(staging / CONFIG_FILE, hf_config)
        if head == "lm" and generation:
            write_json(staging / GENERATION_CONFIG_FILE, generation)
        weight_map = {}
        for number, shard in enumerate(shards, start=1):
            file = SINGLE_FILE if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for spec in shard:  # one layer at a time: the host holds at most one shard
                leaf = flat[spec.path]
                tensors[spec.hf_name] = spec.to_hf(np.asarray(leaf if spec.layer is None else leaf[spec.layer]))
                weight_map[spec.hf_name] = file
            write_tensors(tensors, staging / file, target, caller="save_hf")
        if len(shards) > 1:
            total = sum(int(np.prod(s.hf_shape)) for s in specs) * itemsize
            write_json(staging / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        _publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _warn_missing_id(ids: dict, head: Head, target: Path) -> None:
    """Warn when an export lacks the id transformers needs: a reward model's pad id (batches of more
    than one row are refused without it), a language model's EOS (`generate` never stops early)."""
    name = "pad_token_id" if head == "scalar" else "eos_token_id"
    if ids[name] is None:
        effect = ("transformers' *ForSequenceClassification refuses to score batches of more than one row"
                  if head == "scalar" else "transformers' generate will not stop at an end-of-sequence token")
        warnings.warn(f"save_hf: {target}: no {name} in the model config or a tokenizer, so {effect}; "
                      f"pass the run's tokenizer (tokenizer=) or set the model config's {name}", stacklevel=3)


def write_tensors(tensors: dict, file: Path, target: Path, *, caller: str) -> None:
    """`safetensors.numpy.save_file` into a staging directory; a failed write (disk full, a file size
    limit) raises OSError naming the file and the directory being written, which is left as it was."""
    try:
        save_file(tensors, str(file), metadata={"format": "pt"})
    except SafetensorError as err:
        raise OSError(f"{caller}: writing {file.name} of {target} failed ({err}); {target} was left as it was"
                      ) from err


def _check_params(params: Mapping, abstract: dict) -> dict:
    check_param_shapes(params, _unflatten(abstract), caller="save_hf", error=HFCheckpointError)
    return _flatten(params)


def _common_dtype(flat: dict) -> str:
    dtypes = {leaf_path: jnp.dtype(leaf.dtype).name for leaf_path, leaf in flat.items()}
    first_path, first = next(iter(dtypes.items()))
    if first not in ("float32", "bfloat16"):
        raise HFCheckpointError(f"save_hf: param {'/'.join(first_path)} has dtype {first}, need float32 or bfloat16")
    for leaf_path, name in dtypes.items():
        if name != first:
            raise HFCheckpointError(
                f"save_hf: param {'/'.join(leaf_path)} has dtype {name} but {'/'.join(first_path)} has "
                f"{first}; cast all params to one dtype"
            )
    return first


def _plan_shards(specs: list[_TensorSpec], itemsize: int, limit: int) -> list[list[_TensorSpec]]:
    """Greedy split in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[_TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec.hf_shape)) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _publish(staging: Path, target: Path) -> None:
    """Rename the finished staging directory to `target`, replacing an old one if present.

    The staging directory (and safetensors' files) are created private; the published checkpoint
    gets the permissions the process umask gives ordinary new files and directories.
    """
    umask = os.umask(0)
    os.umask(umask)
    for file in staging.rglob("*"):
        os.chmod(file, (0o777 if file.is_dir() else 0o666) & ~umask)
    os.chmod(staging, 0o777 & ~umask)
    if not target.exists():
        os.rename(staging, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(retired)
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of `max_shard_size`: an int, or a string of bytes or like "2GB" (10^9) or "500MiB" (2^20);
    ValueError otherwise."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        unit = (match.group(2) or "b").lower() if match else None
        if unit not in _SIZE_UNITS:
            raise ValueError(f"save_hf: max_shard_size must be bytes or like '2GB'/'500MiB', got {size!r}")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"save_hf: max_shard_size must be positive, got {size!r}")
    return value


