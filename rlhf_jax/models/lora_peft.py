"""LoRA adapters <-> PEFT's on-disk format (`adapter_config.json` + `adapter_model.safetensors`).

`save_peft` writes a directory that `peft.PeftModel.from_pretrained(transformers_model, path)`
loads onto the Hugging Face model of the same base; `load_peft` reads one that PEFT saved (or we
did) into `(LoraConfig, adapters)` for `LoraLM`. numpy and safetensors only (no torch, no peft).

Tensor names are PEFT's (adapter name stripped, as `PeftModel.save_pretrained` writes them):

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]   (A transposed)
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]  (B transposed)
    base_model.model.model.embed_tokens.lora_embedding_A               [r, V]
    base_model.model.model.embed_tokens.lora_embedding_B               [E, r]
    base_model.model.lm_head.lora_A.weight / lora_B.weight

Our `a` is [(L,) in..., r] and `b` [(L,) r, out...] in the base kernel's layout (`q_proj` [E, H, D],
`o_proj` [H, D, E]); Hugging Face's `nn.Linear` rows are the flattened `out` index h·D + d, the
same flattening `models.hf` uses for the kernels, so the mapping is a reshape and a transpose,
exact in both directions.

A scalar-head model (reward model, critic) is PEFT's `SEQ_CLS` task: its trained `score` head is
saved as `base_model.model.score.weight` [1, E] and listed in `modules_to_save`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.lora import LAYER_TARGETS, LoraConfig, adapter_specs, adapters_of, check_adapters, nest_adapters
from rlhf_jax.models.hf_config import HFCheckpointError, check_replaceable, json_int, json_number, open_safetensors

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_MODULES", "save_peft", "load_peft", "read_peft_config"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# Our target names -> the Hugging Face module names PEFT's `target_modules` use.
PEFT_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                "down": "down_proj", "embed": "embed_tokens", "lm_head": "lm_head"}
_TARGET_OF = {v: k for k, v in PEFT_MODULES.items()}
_MODULE_PATH = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
# Copies of adapted embedding layers' base weights that PEFT saves (`save_embedding_layers`); the
# base weights come from the base model, so these are checked for shape only.
_BASE_COPIES = (_PREFIX + "model.embed_tokens.base_layer.weight", _PREFIX + "lm_head.base_layer.weight")
# adapter_config.json keys whose non-default values change the math we would have to reproduce:
# {key: (default, what it changes)}. An absent, null or empty value is the default.
_UNSUPPORTED = {
    "use_dora": (False, "DoRA rescales each adapted weight by a learned magnitude"),
    "fan_in_fan_out": (False, "the weights are stored transposed (GPT-2's Conv1D)"),
    "layers_to_transform": (None, "only some layers are adapted"),
    "rank_pattern": ({}, "modules have their own rank"),
    "alpha_pattern": ({}, "modules have their own alpha"),
    "bias": ("none", "biases are trained"),
    "use_qalora": (False, "QA-LoRA pools the adapter's input"),
    "lora_bias": (False, "lora_B has a bias"),
    "alora_invocation_tokens": (None, "activated LoRA applies the adapters only from the invocation tokens on"),
    "layer_replication": (None, "layers are replicated (another layer count)"),
    "trainable_token_indices": (None, "embedding rows are trained beside the adapters"),
    "target_parameters": (None, "the adapters act on parameters, not modules"),
    "use_bdlora": (None, "block-diagonal adapters"),
    "kasa_config": (None, "KaSA truncates the base weights and scales by learned singular values"),
    "arrow_config": (None, "Arrow routes between several adapters"),
    "monteclora_config": (None, "MonteCLoRA samples the adapters"),
}
# init_lora_weights values that leave the base weights as they are; the others (PiSSA, OLoRA, CorDA,
# Astra, LoftQ, LoRA-GA) subtract the initial adapters from the base (W_res = W - s·A0·B0), so the
# saved adapters belong on that residual, which PEFT recomputes from the base when it loads them.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica", "nora")


def _tensor_names(name: str, layer: int | None) -> tuple[str, str]:
    """PEFT's (A, B) tensor names of target `name` (in layer `layer` for per-layer targets)."""
    if name == "embed":
        return (_PREFIX + "model.embed_tokens.lora_embedding_A", _PREFIX + "model.embed_tokens.lora_embedding_B")
    module = "lm_head" if name == "lm_head" else f"model.layers.{layer}.{_MODULE_PATH[name]}"
    return _PREFIX + module + ".lora_A.weight", _PREFIX + module + ".lora_B.weight"


def _peft_tensors(config: ModelConfig, lora: LoraConfig, adapters: dict) -> dict[str, np.ndarray]:
    """`{PEFT name: array}` of float32 adapters (`a`, `b` in our layout)."""
    out = {}
    for name, spec in adapter_specs(config, lora).items():
        a, b = (np.asarray(jax.device_get(adapters[name][k]), np.float32) for k in ("a", "b"))
        r = lora.rank
        if name in LAYER_TARGETS:
            for i in range(config.num_layers):
                a_name, b_name = _tensor_names(name, i)
                out[a_name] = np.ascontiguousarray(a[i].reshape(-1, r).T)
                out[b_name] = np.ascontiguousarray(b[i].reshape(r, -1).T)
        else:
            a_name, b_name = _tensor_names(name, None)
            out[a_name], out[b_name] = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
    return out


def save_peft(path: str | os.PathLike, config: ModelConfig, lora: LoraConfig, adapters: dict, *,
              head_params: dict | None = None, base_model_name_or_path: str | None = None, tokenizer=None,
              overwrite: bool = False) -> Path:
    """Write adapters as a PEFT LoRA directory, atomically (assembled beside `path`, then renamed).

    Args:
      path: the directory to create.
      config: the base model's config (shapes).
      lora: the adapters' config (rank, alpha, rsLoRA, dropout, targets).
      adapters: the `lora` part of `LoraLM` params (`{"layers": {...}, "embed": ..., "lm_head": ...}`).
      head_params: for a scalar-head model, `{"score": [E]}`: the trained head PEFT saves as a
        module to save (task `SEQ_CLS`); None for a language model (task `CAUSAL_LM`).
      base_model_name_or_path: recorded in the config (the base model's Hugging Face directory or hub id).
      tokenizer: optional transformers tokenizer saved in the directory (`save_pretrained`), with it.
      overwrite: replace an existing `path` that holds an earlier export (`check_replaceable`).

    Returns:
      The directory's path.

    Raises:
      ValueError: `adapters` do not have `lora`'s targets and rank on a model of `config`.
    """
    from rlhf_jax.models.hf_writer import _publish, write_tensors  # noqa: PLC0415

    target = Path(path)
    check_replaceable(target, overwrite=overwrite, caller="save_peft")
    check_adapters(config, lora, adapters, caller="save_peft")  # else reshaped by the wrong rank, or dropped
    tensors = _peft_tensors(config, lora, adapters_of(adapters))
    seq_cls = head_params is not None
    if seq_cls:
        tensors[_PREFIX + "score.weight"] = np.asarray(jax.device_get(head_params["score"]), np.float32)[None, :]
    peft_config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if seq_cls else "CAUSAL_LM", "r": lora.rank,
        "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "use_rslora": lora.use_rslora,
        "target_modules": sorted(PEFT_MODULES[t] for t in lora.targets), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "modules_to_save": ["score"] if seq_cls else None, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path, "use_dora": False, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with open(staging / ADAPTER_CONFIG, "w", encoding="utf-8") as f:
            json.dump(peft_config, f, indent=2, sort_keys=True)
        write_tensors(tensors, staging / ADAPTER_WEIGHTS, target, caller="save_peft")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        _publish(staging, target)  # the old directory is replaced only once the new one is complete
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_peft_config(path: str | os.PathLike) -> tuple[LoraConfig, dict]:
    """`(LoraConfig, raw adapter_config.json)` of a PEFT LoRA directory; unsupported options raise.

    Targets come from the tensors actually stored (PEFT may save `target_modules` as a regex or
    `all-linear`); a list of module names must name exactly the modules the weights adapt.
    `load_peft` checks them against the file.
    """
    root = Path(path)
    config_file = root / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"load_peft: {config_file} does not exist")
    try:
        with open(config_file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as err:
        raise HFCheckpointError(f"{config_file}: not readable JSON ({err})") from err
    if not isinstance(raw, dict):
        raise HFCheckpointError(f"{config_file}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("peft_type") != "LORA":
        raise HFCheckpointError(f"{config_file}: peft_type must be 'LORA', got {raw.get('peft_type')!r}")
    for key, (default, why) in _UNSUPPORTED.items():
        value = raw.get(key)
        if value is not None and value != default and value not in ([], {}):
            raise HFCheckpointError(f"{config_file}: {key}={value!r} is not supported (only {default!r}): {why}")
    init = raw.get("init_lora_weights", True)
    if init is not None and not any(init == plain and type(init) is type(plain) for plain in _PLAIN_INITS):
        raise HFCheckpointError(
            f"{config_file}: init_lora_weights={init!r} is not supported: PEFT subtracts such initial adapters from "
            "the base weights, so these adapters apply to that residual and not to the base model; save them from "
            "PEFT as plain LoRA (`save_pretrained(..., path_initial_model_for_weight_conversion=...)`) and load that")
    weights = root / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"load_peft: {weights} does not exist")
    with open_safetensors(weights) as f:
        names = list(f.keys())
    targets = set()
    for name in names:
        if name == _PREFIX + "score.weight" or name in _BASE_COPIES:
            continue
        if ".lora_" not in name:  # a trained full copy of a module (PEFT's modules_to_save)
            raise HFCheckpointError(f"{weights}: tensor {name!r} is a full copy of a module (modules_to_save "
                                    f"{raw.get('modules_to_save')!r}), not a LoRA adapter; load_peft reads LoRA "
                                    "adapters and a sequence classifier's score head only")
        module = name.split(".lora_")[0].rsplit(".", 1)[-1]
        if module not in _TARGET_OF:
            raise HFCheckpointError(f"{weights}: tensor {name!r} adapts module {module!r}, which is none of "
                                    f"{sorted(_TARGET_OF)}")
        targets.add(_TARGET_OF[module])
    listed = raw.get("target_modules")
    if isinstance(listed, list) and all(isinstance(m, str) for m in listed):  # not a regex / "all-linear"
        # A name no module of these models has (e.g. another architecture's `c_attn`) matched nothing
        # in PEFT either, which allows that as long as some name matched.
        modules = {m.rsplit(".", 1)[-1] for m in listed} & set(_TARGET_OF)
        stored = {PEFT_MODULES[t] for t in targets}
        if modules != stored:
            raise HFCheckpointError(
                f"{config_file}: target_modules {sorted(modules)} disagree with the modules {weights} holds "
                f"adapters for, {sorted(stored)} (listed without weights: {sorted(modules - stored)}; weights not "
                f"listed: {sorted(stored - modules)})")
    rank, alpha, dropout, rslora = raw.get("r"), raw.get("lora_alpha"), raw.get("lora_dropout"), raw.get("use_rslora")
    if not (json_int(rank) and rank > 0):
        raise HFCheckpointError(f"{config_file}: r must be a positive integer, got {rank!r}")
    if not json_number(alpha):
        raise HFCheckpointError(f"{config_file}: lora_alpha must be a number, got {alpha!r}")
    if dropout is not None and not json_number(dropout):
        raise HFCheckpointError(f"{config_file}: lora_dropout must be a number, got {dropout!r}")
    if rslora is not None and not isinstance(rslora, bool):
        raise HFCheckpointError(f"{config_file}: use_rslora must be true or false, got {rslora!r}")
    try:
        lora = LoraConfig(rank=rank, alpha=float(alpha), use_rslora=bool(rslora), dropout=float(dropout or 0.0),
                          targets=tuple(sorted(targets)))
    except ValueError as err:  # LoraConfig's own checks (ConfigError)
        raise HFCheckpointError(f"{config_file}: {err}") from err
    return lora, raw


def load_peft(path: str | os.PathLike, config: ModelConfig, *, lora: LoraConfig | None = None
              ) -> tuple[LoraConfig, dict, dict | None]:
    """Read a PEFT LoRA directory into `(LoraConfig, adapters, head_params)` for a base of `config`.

    Every expected tensor's presence and shape is checked before any is read: an adapter made for
    another base (other sizes, layers or targets) raises naming the tensor and both shapes.

    Args:
      path: a directory with `adapter_config.json` and `adapter_model.safetensors`.
      config: the base model's config (the adapters must fit its shapes).
      lora: when given, the run's LoRA config: rank, alpha, rsLoRA and targets must equal the file's.

    Returns:
      `(lora_config, adapters, head_params)`: float32 adapters in `LoraLM`'s layout, and
      `{"score": [E]}` for a `SEQ_CLS` adapter with a saved score head (else None).
    """
    root = Path(path)
    found, raw = read_peft_config(root)
    weights = root / ADAPTER_WEIGHTS
    if lora is not None:
        diffs = [f"{field}: {root} has {getattr(found, field)!r}, this run {getattr(lora, field)!r}"
                 for field in ("rank", "alpha", "use_rslora", "targets") if getattr(found, field) != getattr(lora, field)]
        if diffs:
            raise HFCheckpointError(f"{weights}: the adapters' config differs from this run's lora section:\n  "
                                    + "\n  ".join(diffs))
    r = found.rank
    expected: dict[str, tuple[int, ...]] = {}
    plan = []
    for name, spec in adapter_specs(config, found).items():
        k = int(np.prod(spec.a_shape[1:-1] if name in LAYER_TARGETS else spec.a_shape[:-1]))
        n = int(np.prod(spec.b_shape[2:] if name in LAYER_TARGETS else spec.b_shape[1:]))
        layers = range(config.num_layers) if name in LAYER_TARGETS else [None]
        for i in layers:
            a_name, b_name = _tensor_names(name, i)
            expected[a_name], expected[b_name] = (r, k), (n, r)
        plan.append((name, spec, layers))
    head_name = _PREFIX + "score.weight"
    copies = {name: (config.vocab_size, config.hidden_size) for name in _BASE_COPIES}
    with open_safetensors(weights) as f:
        stored = set(f.keys())
        problems = [f"{name}: missing (the model expects shape {shape})" for name, shape in expected.items()
                    if name not in stored]
        problems += [f"{name}: in the file but not expected for this model and targets {list(found.targets)}"
                     for name in sorted(stored - set(expected) - set(copies) - {head_name})]
        for name, shape in {**expected, **{k: v for k, v in copies.items() if k in stored}}.items():
            if name in stored:
                got, kind = tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()
                if got != shape:
                    problems.append(f"{name}: the file has shape {got}, the model expects {shape}")
                if kind not in ("F64", "F32", "F16", "BF16"):
                    problems.append(f"{name}: the file has dtype {kind}, the model expects a floating dtype")
        if head_name in stored:
            got = tuple(f.get_slice(head_name).get_shape())
            if got != (1, config.hidden_size):
                problems.append(f"{head_name}: the file has shape {got}, the model expects {(1, config.hidden_size)}")
        if problems:
            shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
            raise HFCheckpointError(f"{weights} does not fit this base model:\n  {shown}")
        adapters: dict[str, Any] = {}
        for name, spec, layers in plan:
            a = np.empty(spec.a_shape, np.float32)
            b = np.empty(spec.b_shape, np.float32)
            for i in layers:
                a_name, b_name = _tensor_names(name, i)
                at, bt = f.get_tensor(a_name).astype(np.float32), f.get_tensor(b_name).astype(np.float32)
                if i is None:
                    a[...], b[...] = at.T, bt.T
                else:
                    a[i] = at.T.reshape(spec.a_shape[1:])
                    b[i] = bt.T.reshape(spec.b_shape[1:])
            adapters[name] = {"a": a, "b": b}
        head = None if head_name not in stored else {"score": f.get_tensor(head_name).astype(np.float32)[0]}
    return found, nest_adapters(adapters), head
