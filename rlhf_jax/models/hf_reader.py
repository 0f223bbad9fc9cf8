"""Reading a Hugging Face safetensors directory: `_Checkpoint` and the sliced, checked reads of `load_hf`.

`_Checkpoint` maps every tensor name to its file (from `model.safetensors.index.json` or the files'
headers), checks names, shapes and dtypes from the headers alone and reads whole tensors or slices;
`_load_sliced` builds a global array of which this process reads only its devices' blocks.
`rlhf_jax.models.hf.load_hf` is the entry point.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.hf_config import HFCheckpointError, open_safetensors, read_json
from rlhf_jax.models.hf_tensors import _flatten, _TensorSpec
from rlhf_jax.models.transformer import Head

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype names; floating ones may be converted to the requested parameter dtype.
_FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}
_DTYPE_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# Buffers that old checkpoints stored and that we recompute from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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
        """Map every tensor name to its file; the index and the files' headers must agree.

        The files are chosen as transformers' `from_pretrained` chooses them: `model.safetensors`, else
        the shards `model.safetensors.index.json` lists, other `*.safetensors` files beside them (e.g.
        Mistral's `consolidated.safetensors`, a PEFT `adapter_model.safetensors`) being ignored; with
        neither, every `*.safetensors` file of the directory (shards written without an index).
        """
        index_file = root / INDEX_FILE
        if (root / SINGLE_FILE).exists():
            self.source = str(root / SINGLE_FILE)
            self._file_of = dict.fromkeys(self._open(SINGLE_FILE).keys(), SINGLE_FILE)
        elif index_file.exists():
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
