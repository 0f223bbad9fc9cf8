"""Hugging Face interop of rlhf-jax checkpoints: `export_hf` (checkpoint -> HF directory), `import_hf`.

    export_hf("runs/sft_tiny/checkpoints", "out/", step="latest")  # -> HFExport(out_dir, step)
    import_hf("hf_model/", "runs/x/checkpoints")                     # -> 0 (the step written)

The exported directory is what transformers loads: `config.json`, safetensors weights, the run's
tokenizer (the `tokenizer/` directory a run saves beside `checkpoints/`, or the one given), and
`generation_config.json` with the BOS/EOS/pad ids (from the model config, else the tokenizer), so
`generate` stops at EOS and a reward model scores batches (`rlhf_jax.models.hf.save_hf`).
`rlhf-jax export RUN_DIR OUT_DIR` is this function on `RUN_DIR/checkpoints`.

A LoRA run's checkpoint (items `params` = the base, `lora` = the adapters) exports either merged
(`merge=True`: W + s·A·B, a QLoRA base dequantized first, as one plain Hugging Face model) or as
its adapters alone in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`, for
`peft.PeftModel.from_pretrained` on the base the run started from; its `base_model_name_or_path` is
that Hugging Face directory when the run's `config.json` names one in `checkpoint.init_from`, so
`peft.AutoPeftModelForCausalLM.from_pretrained(out_dir)` finds the base by itself).
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from rlhf_jax.checkpoint import Checkpointer, CheckpointMismatchError, is_checkpoint_dir
from rlhf_jax.config import CheckpointConfig

__all__ = ["HFExport", "export_hf", "import_hf"]


class HFExport(NamedTuple):
    """What `export_hf` wrote: the Hugging Face directory and the checkpoint step it holds."""

    out_dir: str
    step: int


def _model_from_checkpoint(ckpt: Checkpointer, step: int, item: str):
    """(ModelConfig, head, abstract params) of the model whose weights are item `item` of `step`."""
    from rlhf_jax.config import from_dict  # noqa: PLC0415
    from rlhf_jax.models import CausalLM, ModelConfig  # noqa: PLC0415

    saved = ckpt.meta(step).get("model_config")
    if saved is None:
        raise CheckpointMismatchError(f"checkpoint {ckpt.directory}/{step} does not record its model config")
    config = from_dict(ModelConfig, saved)
    head = "scalar" if "score" in ckpt.item_shapes(item, step) else "lm"
    return config, head, CausalLM(config, head=head).abstract_params()


def export_hf(directory: str | os.PathLike, out_dir: str | os.PathLike, *, step: int | str | None = None,
              item: str = "params", tokenizer: Any = "auto", overwrite: bool = False, merge: bool = False,
              max_shard_size: int | str = "2GB") -> HFExport:
    """Write the weights of an rlhf-jax checkpoint as a Hugging Face model directory.

    Args:
      directory: a checkpoint root (e.g. `runs/NAME/checkpoints`).
      out_dir: the Hugging Face directory to create (config.json, generation_config.json, safetensors).
      step: a step number, "latest" / None (the newest intact step: a corrupt newer one is skipped
        with a warning), or "best" (by the best metric saved with checkpoints).
      item: the state item holding the parameters.
      tokenizer: the tokenizer written beside the weights; its BOS/EOS/pad ids fill those the model
        config leaves unset. "auto" (default): the run's, saved in `tokenizer/` beside `directory`
        (`rlhf_jax.train.data.saved_tokenizer`), else none; a transformers tokenizer; a tokenizer
        directory or "offline"; None: none. Without one (and without ids in the model config) a
        reward model has no pad id, so transformers scores only one row at a time: `save_hf` warns.
      overwrite: replace an existing `out_dir` that holds an earlier export (a Hugging Face model or
        PEFT directory; `models.hf_config.check_replaceable`). `out_dir` may not be, contain or lie inside
        `directory`.
      merge: for a LoRA run, write the merged model (W + s·A·B); otherwise its adapters in PEFT's
        format. Ignored for a full fine-tuning run (its weights are written as they are).
      max_shard_size: bytes per safetensors file, an int or a string like "2GB" or "500MiB"; larger
        models are split into shards listed by `model.safetensors.index.json` (`save_hf`).
    Returns:
      `HFExport(out_dir, step)`: the directory (a string) and the step exported. A reward model
      (scalar head) is written as `*ForSequenceClassification`.
    Raises:
      FileExistsError: `out_dir` exists and `overwrite` is false, holds something other than an
        export, or overlaps `directory` or the tokenizer directory read.
      FileNotFoundError: `tokenizer` names a directory that does not exist.
      CheckpointCorruptError: the step's files differ from its integrity manifest.
    """
    from rlhf_jax.models.hf import check_replaceable, parse_size, save_hf  # noqa: PLC0415

    parse_size(max_shard_size)  # a bad size is refused before anything is read
    tokenizer_dir = _tokenizer_source(directory, tokenizer)
    sources = (directory,) if tokenizer_dir is None else (directory, tokenizer_dir)
    check_replaceable(out_dir, overwrite=overwrite, caller="export", sources=sources)
    tokenizer = _load_tokenizer(tokenizer, tokenizer_dir)
    with Checkpointer(directory, read_only=True) as ckpt:
        resolved = _resolve_step(ckpt, step)
        config, head, abstract = _model_from_checkpoint(ckpt, resolved, item)
        ckpt.model_config = config
        lora = item == "params" and os.path.isdir(os.path.join(ckpt.directory, str(resolved), "lora"))
        if not lora:
            state, _ = ckpt.restore({item: abstract}, step=resolved)
    if not lora:
        save_hf(out_dir, config, state[item], tokenizer, overwrite=overwrite, max_shard_size=max_shard_size)
    elif merge:
        _export_merged(directory, out_dir, config, head, resolved, tokenizer, overwrite, max_shard_size)
    else:
        _export_adapters(directory, out_dir, config, head, resolved, tokenizer, overwrite)
    return HFExport(os.fspath(out_dir), resolved)


def _tokenizer_source(directory, tokenizer) -> str | None:
    """The directory `export_hf`'s `tokenizer` argument reads ("auto": the run's `tokenizer/` beside the
    checkpoint root, when there is one), checked apart from the output directory before it is loaded."""
    if isinstance(tokenizer, str) and tokenizer == "auto":
        run_tokenizer = os.path.join(os.path.dirname(os.path.normpath(os.fspath(directory))), "tokenizer")
        return run_tokenizer if os.path.isdir(run_tokenizer) else None
    if isinstance(tokenizer, (str, os.PathLike)) and tokenizer != "offline":
        return os.fspath(tokenizer)
    return None


def _load_tokenizer(tokenizer, source: str | None):
    """The tokenizer object of `export_hf`'s `tokenizer` argument (None for none)."""
    from rlhf_jax.train.data import make_tokenizer, saved_tokenizer  # noqa: PLC0415

    if isinstance(tokenizer, str) and tokenizer == "auto":
        return None if source is None else saved_tokenizer(source)  # None: the directory holds no tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        return make_tokenizer(os.fspath(tokenizer))  # "offline" or a directory; FileNotFoundError naming it
    return tokenizer


def _export_merged(directory, out_dir, config, head, step: int, tokenizer, overwrite: bool, max_shard_size) -> None:
    """A LoRA checkpoint's merged weights (`train.weights.initial_params` merges base and adapters)."""
    import jax  # noqa: PLC0415

    from rlhf_jax.models import CausalLM  # noqa: PLC0415
    from rlhf_jax.models.hf import save_hf  # noqa: PLC0415
    from rlhf_jax.train.weights import initial_params  # noqa: PLC0415

    params = initial_params(CausalLM(config, head=head), os.fspath(directory), rng=jax.random.key(0), step=step)
    save_hf(out_dir, config, params, tokenizer, overwrite=overwrite, max_shard_size=max_shard_size)


def _export_adapters(directory, out_dir, config, head, step: int, tokenizer, overwrite: bool) -> None:
    """A LoRA checkpoint's adapters (and a scalar head's score) in PEFT's format."""
    from rlhf_jax.models.lora import LoraConfig, adapters_of  # noqa: PLC0415
    from rlhf_jax.models.lora_peft import save_peft  # noqa: PLC0415
    from rlhf_jax.train.weights import lora_item_of, restore_item  # noqa: PLC0415

    item = lora_item_of(os.fspath(directory), step=step)
    adapters = adapters_of(item["adapters"])
    rank = next(iter(adapters.values()))["a"].shape[-1]
    lora = LoraConfig(rank=rank, alpha=float(item["scale"]) * rank, targets=tuple(adapters))
    head_params = None
    if head == "scalar":  # the trained score head: PEFT's modules_to_save
        head_params = {"score": restore_item(os.fspath(directory), "params", None, step)["score"]}
    save_peft(out_dir, config, lora, item["adapters"], head_params=head_params, tokenizer=tokenizer,
              overwrite=overwrite, base_model_name_or_path=_hf_base_of(directory))


def _hf_base_of(directory) -> str | None:
    """The Hugging Face directory the run whose checkpoints are `directory` started from (as an absolute
    path): its `config.json`'s `checkpoint.init_from`. None when the run records none, or started from a
    random init, an rlhf-jax checkpoint or a directory that is no longer a Hugging Face model."""
    run_config = os.path.join(os.path.dirname(os.path.normpath(os.fspath(directory))), "config.json")
    try:
        with open(run_config, encoding="utf-8") as f:
            init_from = json.load(f)["checkpoint"]["init_from"]
    except (OSError, ValueError, KeyError, TypeError):  # no record, or one edited into something else
        return None
    if (not isinstance(init_from, str) or is_checkpoint_dir(init_from)
            or not os.path.isfile(os.path.join(init_from, "config.json"))):
        return None
    return os.path.abspath(init_from)


def import_hf(hf_dir: str | os.PathLike, directory: str | os.PathLike, *, dtype: str | None = None,
              item: str = "params") -> int:
    """Write a Hugging Face model directory as an rlhf-jax checkpoint (step 0, params only).

    The result can be given to `checkpoint.init_from` or exported back with `export_hf`. The model
    config recorded with it carries the token ids of `generation_config.json` too (every EOS id an
    instruct model stops at, a BOS / pad id config.json leaves unset), so an export writes them back.
    Returns the step written (0).
    """
    from rlhf_jax.models.hf import check_apart, load_hf  # noqa: PLC0415

    check_apart(directory, (hf_dir,), caller="import")
    config, params = load_hf(hf_dir, dtype=dtype)
    config = _with_generation_ids(config, hf_dir)
    with Checkpointer(directory, config=CheckpointConfig(async_save=False), model_config=config) as ckpt:
        if ckpt.all_steps():
            raise FileExistsError(f"{os.fspath(directory)} already holds checkpoints {ckpt.all_steps()}")
        ckpt.save(0, {item: params})
    return 0


def _with_generation_ids(config, hf_dir):
    """`config` with the token ids of `hf_dir`'s generation_config.json (when there is one) folded in."""
    from pathlib import Path  # noqa: PLC0415

    from rlhf_jax.models.hf_config import (  # noqa: PLC0415
        GENERATION_CONFIG_FILE, HFCheckpointError, as_ids, json_int, read_json)

    file = Path(hf_dir) / GENERATION_CONFIG_FILE
    if not file.is_file():
        return config
    raw = read_json(file)
    found = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = raw.get(name)
        ids = value if isinstance(value, list) else [] if value is None else [value]
        if not all(json_int(i) and 0 <= i < config.vocab_size for i in ids):
            raise HFCheckpointError(f"{file}: {name} must be a token id or a list of them in the model's "
                                    f"vocabulary of {config.vocab_size} ids, got {value!r}")
        found[name] = ids
    stops = tuple(dict.fromkeys(as_ids(config.eos_token_id) + found["eos_token_id"]))
    changes = {"eos_token_id": None if not stops else stops[0] if len(stops) == 1 else stops}
    for name in ("bos_token_id", "pad_token_id"):
        if getattr(config, name) is None and len(found[name]) == 1:
            changes[name] = found[name][0]
    return config.replace(**changes)


def _resolve_step(ckpt: Checkpointer, step: int | str | None) -> int:
    if step in (None, "latest"):
        resolved = ckpt.latest_step()
    elif step == "best":
        resolved = ckpt.best_step()
        if resolved is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory} was saved with the best metric")
    else:
        try:
            resolved = int(step)
        except (TypeError, ValueError):
            raise ValueError(f"export_hf: step must be a step number, 'latest' or 'best', got {step!r}") from None
    if resolved is None or resolved not in ckpt.all_steps():
        raise FileNotFoundError(f"no checkpoint {step if step is not None else ''} in {ckpt.directory}; "
                                f"available steps: {ckpt.all_steps()}")
    ckpt.require_intact(resolved)  # a step asked for by number: checked before its metadata is read
    return resolved
