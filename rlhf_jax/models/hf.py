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

Supported `model_type`s: llama (incl. `attention_bias` / `mlp_bias`), mistral (sliding window),
qwen2 (q/k/v bias, sliding window when every layer uses it), qwen3 (q/k RMSNorm, explicit
`head_dim`, `attention_bias`); RoPE scaling "llama3", "linear", "yarn", "longrope" and "dynamic"
(`rlhf_jax.models.config.RopeScaling`). `*ForSequenceClassification` checkpoints with one label
(`score.weight` [1, E]) load as the scalar head (`CausalLM(config, head="scalar")`); their params
carry `score` instead of `lm_head`. A bare `*Model` checkpoint (the backbone saved on its own, its
tensor names without the `model.` prefix) loads as the backbone: a complete language model when its
embedding is tied, otherwise (with `allow_headless`) params without `lm_head`, for a reward model or
critic to start from. Old Llama checkpoints that still store `rotary_emb.inv_freq` buffers load (the
buffers are recomputed from the config, never read).

The config half (`config_from_hf`, `config_to_hf`, `HFCheckpointError`, the token ids of an export)
lives in `rlhf_jax.models.hf_config`; this module re-exports it. The tensor-name table is
`rlhf_jax.models.hf_tensors`, the safetensors reader `rlhf_jax.models.hf_reader`, the export's file
writing (shards, atomic publish) `rlhf_jax.models.hf_writer`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

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
from rlhf_jax.models.hf_reader import (
    INDEX_FILE,
    SINGLE_FILE,
    _check_tied_copy,
    _Checkpoint,
    _declared_dtype,
    _flat_shardings,
    _head_of,
    _load_sliced,
)
from rlhf_jax.models.hf_tensors import BACKBONE_PREFIX, _checked_specs, _flatten, _TensorSpec, _unflatten
from rlhf_jax.models.hf_writer import _plan_shards, _publish, parse_size, write_tensors
from rlhf_jax.models.transformer import Head, check_param_shapes

__all__ = [
    "load_hf", "save_hf", "warn_pad_pooling", "write_tensors", "parse_size", "SINGLE_FILE", "INDEX_FILE",
    # re-exported from rlhf_jax.models.hf_config
    "CONFIG_FILE", "GENERATION_CONFIG_FILE", "SUPPORTED_MODEL_TYPES", "HFCheckpointError", "as_ids", "check_apart",
    "check_replaceable", "config_from_dict", "config_from_hf", "config_to_hf", "export_token_ids",
    "open_safetensors", "read_json", "write_json",
]


# ------------------------------------------------------------------------------------------ load


def load_hf(path: str | os.PathLike, *, dtype: str | None = None, shardings=None,
            allow_headless: bool = False) -> tuple[ModelConfig, dict]:
    """Read a local Hugging Face checkpoint directory into `(ModelConfig, params)`.

    Every tensor's name, shape and dtype is checked against the config from the safetensors
    headers before any data is read, so a bad checkpoint raises and nothing half-loaded is returned.
    Each parameter is assembled on the host (layers stacked) and then put on device, one at a time.

    Args:
      path: a directory with config.json and model.safetensors, or shards listed by
        model.safetensors.index.json (transformers' order: the single file first; any *.safetensors
        files when there is neither).
      dtype: parameter dtype, "float32" or "bfloat16" (any floating checkpoint converts). None keeps
        the checkpoint's dtype: every tensor must then have the dtype config.json declares (float16
        is upcast to float32 exactly).
      shardings: optional tree like the params of `jax.sharding.Sharding`s to place each parameter
        directly (e.g. from `rlhf_jax.sharding`); default: the default device. Its `lm_head` entry is
        ignored for a headless checkpoint.
      allow_headless: accept a bare `*Model` checkpoint (backbone tensors without the `model.` prefix)
        that holds no LM head (no `lm_head.weight`, embedding untied), returning its params without
        `lm_head`: the backbone for a scalar head to be added to (e.g. `heads.init_scalar_head`).
    Returns:
      (config, params): `config.param_dtype` and `config.dtype` equal the loaded dtype; `params` is
      the nested dict of `CausalLM(config, head=...).init`, with `score` instead of `lm_head` for a
      `*ForSequenceClassification` checkpoint (load it with `head="scalar"`), and without `lm_head`
      for a headless one. A scalar-head checkpoint whose pad_token_id is an EOS id gets a warning
      (`warn_pad_pooling`): transformers scores it elsewhere.
    Raises:
      FileNotFoundError: the directory, config.json or a shard is missing.
      HFCheckpointError: an unsupported config, missing, extra, mis-shaped or wrongly typed tensors,
        naming the file and the tensor, or a headless checkpoint without `allow_headless`.
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
        prefix = _backbone_prefix(ckpt.names)
        headless = (not prefix and head == "lm" and not config.tie_word_embeddings
                    and "lm_head.weight" not in ckpt.names)
        if headless and not allow_headless:
            raise HFCheckpointError(
                f"{ckpt.source}: a bare backbone checkpoint ({', '.join(raw.get('architectures') or ['*Model'])}: "
                "tensor names without the 'model.' prefix) with no 'lm_head.weight' and tie_word_embeddings false "
                "holds no LM head, so it cannot be loaded as a language model; start a reward model or critic "
                "from its backbone (load_hf(..., allow_headless=True)), or use its *ForCausalLM checkpoint")
        specs, abstract = _checked_specs(config, head, prefix=prefix, headless=headless)
        declared = None if dtype is not None else _declared_dtype(raw, specs[0], ckpt)
        ckpt.check(specs, declared, tied=config.tie_word_embeddings and head == "lm")
        if headless and shardings is not None:
            shardings = {k: v for k, v in shardings.items() if k != "lm_head"}
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


def _backbone_prefix(names) -> str:
    """The prefix of a checkpoint's backbone tensor names: "" in a bare `*Model` checkpoint (the embedding
    stored as `embed_tokens.weight`), else `BACKBONE_PREFIX` ("model.")."""
    bare = f"{BACKBONE_PREFIX}embed_tokens.weight" not in names and "embed_tokens.weight" in names
    return "" if bare else BACKBONE_PREFIX


def warn_pad_pooling(pad, eos, where: str, advice: str) -> None:
    """Warn when a scalar head's pad id is an EOS id: transformers' `*ForSequenceClassification` scores a
    row at its last token that is not `pad_token_id` (before a trailing EOS), while `heads.gather_last`
    reads the last real token of the mask (the EOS), so the two score EOS-terminated rows differently."""
    if pad is not None and pad in as_ids(eos):
        warnings.warn(f"{where}: pad_token_id {pad} is also an EOS id; transformers' *ForSequenceClassification "
                      "scores a row at its last token that is not the pad id, i.e. before a trailing EOS, while "
                      f"rlhf_jax scores at the last real token of the mask (the EOS): {advice}", stacklevel=3)


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
