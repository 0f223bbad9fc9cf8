"""Hugging Face `config.json` <-> `ModelConfig`, and the token ids an export writes for generation.

`config_from_hf` reads a transformers config (the transformers 5 and 4 layouts), `config_to_hf`
writes one; `export_token_ids` picks the BOS/EOS/pad ids of an exported `config.json` and its
`generation_config.json`; `check_replaceable` guards the directory an export writes.
`rlhf_jax.models.hf` (weights) re-exports the public names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rlhf_jax.models.config import ROPE_SCALING_FIELDS, ModelConfig, RopeScaling
from rlhf_jax.models.transformer import Head

__all__ = [
    "CONFIG_FILE",
    "GENERATION_CONFIG_FILE",
    "SUPPORTED_MODEL_TYPES",
    "HFCheckpointError",
    "config_from_hf",
    "config_to_hf",
    "export_token_ids",
    "check_replaceable",
    "open_safetensors",
    "check_apart",
]

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_ARCH_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
# Defaults of the transformers config classes, for keys a config.json may omit.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768}
_DEFAULT_ROPE_THETA = 10000.0
_YARN_BETA_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0}  # transformers' _compute_yarn_parameters
_DEFAULT_MAX_WINDOW_LAYERS = 28
# Absent keys only: an explicit null means kv heads = heads, head_dim = hidden / heads, no window.
_DEFAULT_KV_HEADS = {"mistral": 8, "qwen2": 32, "qwen3": 32}
_DEFAULT_HEAD_DIM = {"qwen3": 128}
_DEFAULT_SLIDING_WINDOW = 4096  # mistral, qwen2 and qwen3 (the latter two with use_sliding_window)


class HFCheckpointError(ValueError):
    """A Hugging Face config or checkpoint this package cannot read or write faithfully."""


# ---------------------------------------------------------------------------------------- config


def config_from_hf(hf_config: Mapping[str, Any] | str | os.PathLike) -> ModelConfig:
    """Translate a Hugging Face `config.json` (a dict, the file, or its directory) to a `ModelConfig`.

    Reads both the transformers 5 layout (`rope_parameters`) and the older one (`rope_theta` +
    `rope_scaling`). The parameter dtype is the config's `dtype`/`torch_dtype` (float16 becomes
    float32, a lossless upcast); the compute dtype equals it. Runtime fields Hugging Face does not
    describe (`scan_layers`, `remat`) keep their defaults. A key the config omits takes the default of
    its transformers config class (e.g. Mistral's 4096-token window, Qwen3's head_dim 128).

    Args:
      hf_config: a config dict (e.g. `PretrainedConfig.to_dict()`), a path to `config.json`, or a
        checkpoint directory containing it.
    Returns:
      The `ModelConfig`.
    Raises:
      FileNotFoundError: no config.json at the path.
      HFCheckpointError: an unsupported `model_type`, rope type, activation or layer layout, naming
        the file and the key.
    """
    if isinstance(hf_config, Mapping):
        return config_from_dict(dict(hf_config), "<config dict>")
    path = Path(hf_config)
    file = path / CONFIG_FILE if path.is_dir() else path
    return config_from_dict(read_json(file), str(file))


def json_int(value) -> bool:
    """Whether a JSON value is an integer (not a bool, which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def json_number(value) -> bool:
    """Whether a JSON value is a number (int or float, not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def config_from_dict(d: dict, source: str) -> ModelConfig:
    """`config_from_hf` of a config dict; errors name `source` (the file it came from)."""

    def fail(message):
        raise HFCheckpointError(f"{source}: {message}")

    def required(key):
        if d.get(key) is None:
            fail(f"missing required key {key!r}")
        return positive_int(key)

    def positive_int(key):
        value = d.get(key)
        if value is not None and not (json_int(value) and value > 0):
            fail(f"{key} must be a positive integer, got {value!r}")
        return value

    def number(key, default, *, positive=False):
        value = d.get(key, default)
        if not json_number(value):
            fail(f"{key} must be a number, got {value!r}")
        if positive and not value > 0:
            fail(f"{key} must be positive, got {value!r}")
        return float(value)

    def flag(key):
        value = d.get(key)
        if value is not None and not isinstance(value, bool):
            fail(f"{key} must be true or false, got {value!r}")
        return bool(value)

    def token_id(key):
        value = d.get(key)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(json_int(v) for v in ids):
            fail(f"{key} must be an integer token id or a list of them, got {value!r}")
        return _token_id(value)

    archs = d.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        fail(f"architectures must be a list of class names, got {archs!r}")
    model_type = d.get("model_type")
    run_dir = (os.path.dirname(source) or ".") if os.path.basename(source) == CONFIG_FILE else None
    if model_type is None and run_dir is not None and os.path.isdir(os.path.join(run_dir, "checkpoints")):
        raise HFCheckpointError(f"{run_dir} is an rlhf-jax run directory, not a Hugging Face model directory: "
                                f"pass its checkpoints, {os.path.join(run_dir, 'checkpoints')}, or write a Hugging "
                                f"Face directory with `rlhf-jax export {run_dir} OUT_DIR`")
    if model_type not in SUPPORTED_MODEL_TYPES:
        fail(f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    for key in ("tie_word_embeddings", "use_sliding_window"):
        flag(key)
    act = d.get("hidden_act", "silu")
    if act != "silu":
        fail(f"hidden_act {act!r} is not supported (only 'silu', i.e. SwiGLU)")
    # transformers' llama and qwen3 give q/k/v/o biases with attention_bias, llama gate/up/down biases with
    # mlp_bias; qwen2 always has q/k/v biases; mistral (and qwen2 / qwen3 the other key) ignore the keys.
    out_bias = flag("attention_bias") and model_type in ("llama", "qwen3")
    mlp_bias = flag("mlp_bias") and model_type == "llama"

    num_heads = required("num_attention_heads")
    hidden = required("hidden_size")
    head_dim = positive_int("head_dim") if "head_dim" in d else _DEFAULT_HEAD_DIM.get(model_type)
    if head_dim is None:
        if hidden % num_heads:
            fail(f"head_dim is absent and hidden_size {hidden} is not a multiple of num_attention_heads {num_heads}")
        head_dim = hidden // num_heads
    num_layers = required("num_hidden_layers")
    max_positions = positive_int("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[model_type]
    rope_theta, rope_scaling = _rope_from_hf(d, max_positions, fail)
    dtype = _param_dtype_from_hf(d, fail)

    fields = dict(
        model_type=model_type,
        vocab_size=required("vocab_size"),
        hidden_size=hidden,
        intermediate_size=required("intermediate_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=(positive_int("num_key_value_heads") if "num_key_value_heads" in d
                      else _DEFAULT_KV_HEADS.get(model_type)) or num_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        rms_norm_eps=number("rms_norm_eps", 1e-6, positive=True),
        tie_word_embeddings=flag("tie_word_embeddings"),
        attention_bias=model_type == "qwen2" or out_bias,
        attention_out_bias=out_bias,
        mlp_bias=mlp_bias,
        qk_norm=model_type == "qwen3",
        sliding_window=_sliding_window_from_hf(d, model_type, num_layers, fail),
        param_dtype=dtype,
        dtype=dtype,
        initializer_range=number("initializer_range", 0.02),
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"),
        pad_token_id=token_id("pad_token_id"),
    )

    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:  # ModelConfig's own checks, e.g. a token id
        fail(f"{e}")


def _rope_from_hf(d: dict, max_positions: int, fail) -> tuple[float, RopeScaling | None]:
    """(rope_theta, RopeScaling or None) for rope types default, llama3, linear, yarn, longrope and dynamic
    (transformers' `modeling_rope_utils` defaults); `rope_scaling` takes precedence, as in transformers, and
    so does a top-level `original_max_position_embeddings` (Phi-3's layout) over the rope parameters' own."""
    where = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    params = d.get(where) or {}
    if not isinstance(params, Mapping):
        fail(f"{where} must be an object, got {params!r}")
    if any(isinstance(v, Mapping) for v in params.values()):
        fail(f"per-layer-type rope parameters are not supported: {params}")
    theta = params.get("rope_theta", d.get("rope_theta", _DEFAULT_ROPE_THETA))
    if not (json_number(theta) and theta > 0):
        fail(f"rope_theta must be a positive number, got {theta!r}")
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if partial is not None and partial != 1.0:
        fail(f"partial_rotary_factor {partial} is not supported (RoPE covers the whole head)")
    type_key = "rope_type" if "rope_type" in params else "type"
    rope_type = params.get(type_key, "default")
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_SCALING_FIELDS:
        fail(f"{where}.{type_key} {rope_type!r} is not supported (supported: 'default', "
             f"{', '.join(map(repr, sorted(ROPE_SCALING_FIELDS)))}); loading it without that RoPE scaling "
             "would change the model's logits")
    fields = {"rope_type": rope_type}
    required = {"llama3": ("factor", "low_freq_factor", "high_freq_factor"), "linear": ("factor",),
                "yarn": ("factor",), "longrope": ("short_factor", "long_factor"), "dynamic": ("factor",)}[rope_type]
    for key in required:
        if key not in params:
            fail(f"{rope_type} rope scaling lacks {key!r}")
    uses_original = "original_max_position_embeddings" in ROPE_SCALING_FIELDS[rope_type]
    original = params.get("original_max_position_embeddings")
    if uses_original and d.get("original_max_position_embeddings") is not None:  # standardize_rope_params
        original = d["original_max_position_embeddings"]
    if original is not None and not (json_int(original) and original > 0):
        fail(f"{rope_type} rope scaling's original_max_position_embeddings must be a positive integer, got {original!r}")
    if uses_original:
        # transformers' standardize_rope_params: absent means the config's max_position_embeddings
        fields["original_max_position_embeddings"] = int(original or max_positions)
    if rope_type in ("yarn", "longrope") and params.get("factor") is None:
        # as transformers: the ratio of the two context lengths
        fields["factor"] = max_positions / fields["original_max_position_embeddings"]
    for key in ROPE_SCALING_FIELDS[rope_type]:
        if key in fields or key not in params:
            continue
        value = params[key]
        if key in ("beta_fast", "beta_slow"):
            value = value or _YARN_BETA_DEFAULTS[key]  # transformers reads `get(key) or default`
        if key in ("short_factor", "long_factor"):
            if not (isinstance(value, list) and value and all(json_number(v) and v > 0 for v in value)):
                fail(f"longrope rope scaling's {key} must be a non-empty list of positive numbers, got {value!r}")
            fields[key] = tuple(float(v) for v in value)
            continue
        if key == "truncate":
            if not isinstance(value, bool):
                fail(f"yarn rope scaling's truncate must be true or false, got {value!r}")
        elif key in ("mscale", "mscale_all_dim", "attention_factor") and value is None:
            continue
        elif not (json_number(value) and (value > 0 or key.startswith("mscale"))):
            fail(f"{rope_type} rope scaling's {key} must be a {'' if key.startswith('mscale') else 'positive '}"
                 f"number, got {value!r}")
        fields[key] = value if key == "truncate" else float(value)
    try:
        return theta, RopeScaling(**fields)
    except ValueError as err:  # RopeScaling's own checks, e.g. low_freq_factor >= high_freq_factor
        fail(f"{rope_type} rope scaling: {err}")


def _sliding_window_from_hf(d: dict, model_type: str, num_layers: int, fail) -> int | None:
    """The one window every layer uses, or None; a mix of full and windowed layers is an error."""
    if model_type == "llama":
        return None
    window = d.get("sliding_window", _DEFAULT_SLIDING_WINDOW)
    if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
        window = None
    if window is None:
        return None
    if not (json_int(window) and window > 0):
        fail(f"sliding_window must be a positive integer or null, got {window!r}")
    layer_types = d.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != num_layers or any(
            t not in ("full_attention", "sliding_attention") for t in layer_types)):
        fail(f"layer_types must list 'full_attention' or 'sliding_attention' for each of the {num_layers} layers, "
             f"got {layer_types!r}")
    if layer_types is None:
        if model_type == "mistral":
            return window
        start = d.get("max_window_layers", _DEFAULT_MAX_WINDOW_LAYERS)
        if not (json_int(start) and start >= 0):
            fail(f"max_window_layers must be an integer >= 0, got {start!r}")
        layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
    kinds = set(layer_types)
    if model_type == "mistral" and kinds != {"sliding_attention"}:
        fail(f"layer_types {layer_types} gives full-attention layers, but transformers' Mistral ignores layer_types "
             f"and windows every layer to sliding_window {window}; set sliding_window to null for full attention")
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return window
    fail(f"layer_types mixes full and sliding-window attention ({layer_types}); only one kind for all "
         "layers is supported")


def _param_dtype_from_hf(d: dict, fail) -> str:
    name = d.get("dtype") or d.get("torch_dtype") or "float32"
    if name in ("float32", "float16"):
        return "float32"
    if name == "bfloat16":
        return "bfloat16"
    fail(f"dtype {name!r} is not supported (float32, bfloat16 or float16)")


def _token_id(value):
    if isinstance(value, list):
        return tuple(value)
    return value


def config_to_hf(config: ModelConfig, *, head: Head = "lm") -> dict:
    """The Hugging Face `config.json` dict of a `ModelConfig` (transformers 5 and 4 both read it).

    Writes `rope_parameters` (transformers 5) and the older `rope_theta`/`rope_scaling` keys, and
    `dtype`/`torch_dtype` from `param_dtype`.

    Args:
      config: the model configuration.
      head: "lm" for `*ForCausalLM`, "scalar" for `*ForSequenceClassification` with one label.
    Returns:
      A JSON-serializable dict.
    Raises:
      HFCheckpointError: the config uses a feature its `model_type` cannot express in transformers
        (e.g. q/k norm outside qwen3, q/k/v bias without an o_proj bias outside qwen2, MLP biases outside
        llama, a sliding window in llama).
    """
    c = config
    if head not in ("lm", "scalar"):
        raise ValueError(f"config_to_hf: head must be 'lm' or 'scalar', got {head!r}")

    def need(field, value, why):
        if getattr(c, field) != value:
            raise HFCheckpointError(
                f"config_to_hf: model_type {c.model_type!r} requires {field}={value!r} ({why}), got "
                f"{getattr(c, field)!r}"
            )

    need("qk_norm", c.model_type == "qwen3", "q/k RMSNorm is qwen3's alone")
    if c.model_type == "qwen2":
        need("attention_bias", True, "its q/k/v projections always have biases")
        need("attention_out_bias", False, "its o_proj never has a bias")
    elif c.model_type == "mistral":
        need("attention_bias", False, "its attention projections have no biases")
        need("attention_out_bias", False, "its attention projections have no biases")
    else:
        need("attention_out_bias", c.attention_bias, "its attention_bias gives q/k/v and o_proj biases together")
    if c.model_type != "llama":
        need("mlp_bias", False, "MLP biases are llama's alone")
    if c.model_type == "llama":
        need("sliding_window", None, "transformers' llama has no sliding window")

    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    legacy_scaling = None
    if c.rope_scaling is not None:
        legacy_scaling = c.rope_scaling.hf_parameters()
        rope = {**legacy_scaling, "rope_theta": c.rope_theta}
    suffix = "ForCausalLM" if head == "lm" else "ForSequenceClassification"
    out = {
        "model_type": c.model_type,
        "architectures": [_ARCH_PREFIX[c.model_type] + suffix],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "initializer_range": c.initializer_range,
        "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings,
        "rope_parameters": rope,
        "rope_theta": c.rope_theta,
        "rope_scaling": legacy_scaling,
        "bos_token_id": _json_token_id(c.bos_token_id),
        "eos_token_id": _json_token_id(c.eos_token_id),
        "pad_token_id": _json_token_id(c.pad_token_id),
        "dtype": c.param_dtype,
        "torch_dtype": c.param_dtype,
        "use_cache": True,
    }
    if c.model_type in ("llama", "qwen3"):
        out["attention_bias"] = c.attention_bias
    if c.model_type == "llama":
        out["mlp_bias"] = c.mlp_bias
    if c.model_type == "mistral":
        out["sliding_window"] = c.sliding_window
    if c.model_type in ("qwen2", "qwen3"):
        windowed = c.sliding_window is not None
        out["use_sliding_window"] = windowed
        out["sliding_window"] = c.sliding_window
        out["max_window_layers"] = 0 if windowed else c.num_layers
        out["layer_types"] = ["sliding_attention" if windowed else "full_attention"] * c.num_layers
    if head == "scalar":
        out["id2label"] = {"0": "LABEL_0"}
        out["label2id"] = {"LABEL_0": 0}
    return out


def _json_token_id(value):
    return list(value) if isinstance(value, tuple) else value


def as_ids(value) -> list[int]:
    return [] if value is None else [int(v) for v in (value if isinstance(value, (tuple, list)) else (value,))]


def export_token_ids(config: ModelConfig, tokenizer) -> tuple[dict, dict]:
    """(BOS/EOS/pad ids for config.json, the generation_config.json dict) of an export.

    config.json's ids are the model config's, each unset one taken from `tokenizer` (an object with
    `bos_token_id` / `eos_token_id` / `pad_token_id`, or None); generation_config.json's EOS is every id
    the model config or the tokenizer stops at (as instruct models ship it), so `generate` stops at EOS.

    Raises:
      HFCheckpointError: an id outside the model's vocabulary.
    """
    ids = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ours = getattr(config, name)
        ids[name] = ours if ours is not None else getattr(tokenizer, name, None)
    stops = list(dict.fromkeys(as_ids(config.eos_token_id) + as_ids(getattr(tokenizer, "eos_token_id", None))))
    for name, values in [*((n, as_ids(v)) for n, v in ids.items()), ("eos_token_id", stops)]:
        if any(not 0 <= v < config.vocab_size for v in values):
            raise HFCheckpointError(f"save_hf: {name} {values} (model config or tokenizer) is outside the model's "
                                    f"vocabulary of {config.vocab_size} ids")
    generation = {k: _json_token_id(v) for k, v in ids.items() if v is not None}
    if stops:
        generation["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    return ids, generation


# ---------------------------------------------------------------------------------- directories


def check_apart(target, sources, *, caller: str) -> None:
    """Raise FileExistsError when the output directory `target` is, contains or lies inside any of
    `sources` (what is being read): writing it would destroy or mix into them."""
    here = os.path.realpath(target)
    for source in sources:
        there = os.path.realpath(source)
        if os.path.commonpath([here, there]) in (here, there):
            relation = "is" if here == there else "contains" if there.startswith(here + os.sep) else "lies inside"
            raise FileExistsError(f"{caller}: the output directory {target} {relation} {source}, which it reads "
                                  "from; choose a directory outside it")


def open_safetensors(path: str | os.PathLike):
    """`safetensors.safe_open(path, framework="np")`; a damaged file raises `HFCheckpointError` naming it."""
    from safetensors import safe_open  # noqa: PLC0415

    try:
        return safe_open(str(path), framework="np")
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise HFCheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def check_replaceable(target: Path, *, overwrite: bool, caller: str, sources: tuple = ()) -> None:
    """Refuse to write a Hugging Face or PEFT directory at `target` where that could destroy data.

    An existing `target` is replaced only with `overwrite`, and only when it is empty or holds an
    earlier export: `config.json` beside safetensors weights, or a PEFT `adapter_config.json`. And
    `target` may not be, contain or lie inside any of `sources` (what the export reads from), which
    replacing or filling it would destroy or mix into.

    Raises:
      FileExistsError: naming `target` and what it holds.
    """
    check_apart(target, sources, caller=caller)
    if not os.path.lexists(target):
        return
    if not overwrite:
        raise FileExistsError(f"{caller}: {target} exists (pass overwrite=True, or --overwrite on the command "
                              "line, to replace it)")
    if not os.path.isdir(target) or os.path.islink(target):
        raise FileExistsError(f"{caller}: {target} exists and is not a directory; not replacing it")
    names = set(os.listdir(target))
    exported = "adapter_config.json" in names or (
        CONFIG_FILE in names and any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json")
                                     for n in names))
    if names and not exported:
        raise FileExistsError(f"{caller}: {target} holds files that are not a Hugging Face model or PEFT adapter "
                              f"directory (e.g. {sorted(names)[0]!r}); --overwrite replaces only an earlier "
                              "export, so nothing was written")


# ------------------------------------------------------------------------------------------ json


def read_json(file: Path) -> dict:
    if not file.exists():
        raise FileNotFoundError(f"{file} not found (a Hugging Face checkpoint needs it)")
    try:
        with open(file, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise HFCheckpointError(f"{file}: invalid JSON ({err})") from err
    if not isinstance(data, dict):
        raise HFCheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def write_json(file: Path, data: dict) -> None:
    with open(file, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
