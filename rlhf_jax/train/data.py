"""A run's data: its tokenizer, tokenized train / eval splits and batch iterators, checked before
anything is compiled."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np

from rlhf_jax import sharding as sh
from rlhf_jax.config import ConfigError
from rlhf_jax.data import BatchConfig, BatchIterator, TokenizeConfig, TokenizedDataset, load_dataset, load_tokenizer
from rlhf_jax.data.formats import Kind
from rlhf_jax.data.sharded import ShardedDataset, load_sharded
from rlhf_jax.data.sources import SourceError
from rlhf_jax.models import ModelConfig
from rlhf_jax.models.hf_config import as_ids
from rlhf_jax.train.run_config import DataConfig

__all__ = ["RunData", "load_run_data", "make_tokenizer", "load_split", "train_batches", "eval_batches", "HeldOut",
           "held_out_batches", "batches_from", "device_batch", "check_vocab", "check_batch_size",
           "one_pass"]

_EVAL_SEED_OFFSET = 1_000_003


def make_tokenizer(spec: str):
    """The tokenizer of `data.tokenizer`: "offline" or a local directory (FileNotFoundError otherwise)."""
    if spec == "offline":
        from rlhf_jax.data.offline_tokenizer import offline_tokenizer  # noqa: PLC0415

        return offline_tokenizer()
    return load_tokenizer(spec)


def saved_tokenizer(path: str):
    """The tokenizer saved with a model: in `path` (a Hugging Face directory) or in a `tokenizer/`
    directory beside it (an rlhf-jax run's checkpoints); None when there is none."""
    for candidate in (path, os.path.join(os.path.dirname(os.path.normpath(path)), "tokenizer")):
        if os.path.isfile(os.path.join(candidate, "tokenizer.json")) or \
                os.path.isfile(os.path.join(candidate, "tokenizer_config.json")):
            return make_tokenizer(candidate)
    return None


def check_vocab(tokenizer, model_config: ModelConfig) -> None:
    """Raise ConfigError when the tokenizer has ids the model's embedding cannot hold, or a special
    token id of `model_config` (what an export writes into config.json) lies outside the vocabulary
    (a preset's ids left on a smaller checkpoint: found here, not by the export after training)."""
    n = len(tokenizer)
    if n > model_config.vocab_size:
        raise ConfigError(f"the tokenizer has {n} ids but model.vocab_size is {model_config.vocab_size}; "
                          "use a model whose vocabulary covers the tokenizer")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(model_config, name)
        if any(not 0 <= i < model_config.vocab_size for i in as_ids(value)):
            raise ConfigError(f"model.{name}={value!r} is outside the model's vocabulary "
                              f"[0, model.vocab_size={model_config.vocab_size}): set model.{name} to the "
                              "checkpoint's (its config.json), or none to take the tokenizer's")


def load_split(data: DataConfig, *, kind: Kind, which: Literal["train", "eval"], tokenizer,
               tokenize: TokenizeConfig | None = None) -> TokenizedDataset | ShardedDataset | None:
    """Read, validate and tokenize the train or eval source (None when `data.eval` is None).

    `tokenize`: how rows become ids, in place of `data.tokenize` (an agentic chat run's prompts are
    rendered with its tools: `rlhf_jax.train.agentic.load_data`).

    In a multi-process run every process tokenizes only its share (`rlhf_jax.data.sharded`: its
    rows to validate them, then the examples its devices receive); the batches are those of one
    process.

    Raises:
      FileNotFoundError: the source path does not exist (named with its config key), raised before
        any model is built.
      ConfigError: a source of an unknown file type or directory layout, or without the split asked
        for (named with its config key).
      DataError: a bad row (file, line and problem), unless `data.on_error="skip"`.
    """
    source = data.train if which == "train" else data.eval
    if source is None:
        return None
    tokenize = data.tokenize if tokenize is None else tokenize
    task = data.task(which)
    if task is not None:
        n, seed = (data.num_train, data.seed) if which == "train" else (data.num_eval, data.seed + _EVAL_SEED_OFFSET)
        rows = task.rows(kind, n, seed=seed, label_noise=data.label_noise if which == "train" else 0.0)
        if rows is None:
            raise ConfigError(f"data.{which}: {source} has no {kind!r} data; it has {sorted(task.spec.rows)}")
        return _load(rows, kind=kind, tokenizer=tokenizer, config=tokenize, on_error=data.on_error)
    if not os.path.exists(source):
        raise FileNotFoundError(f"data.{which}: {source} does not exist")
    split = data.split if which == "train" else data.eval_split
    try:
        return _load(source, kind=kind, tokenizer=tokenizer, config=tokenize, on_error=data.on_error, split=split)
    except SourceError as e:  # an unknown file type or directory layout, a missing split
        raise ConfigError(f"data.{which}: {e}") from None


def _load(source, **kwargs) -> TokenizedDataset | ShardedDataset:
    import jax  # noqa: PLC0415

    if jax.process_count() == 1:
        return load_dataset(source, **kwargs)
    from rlhf_jax.distributed import gather_rows  # noqa: PLC0415

    return load_sharded(source, index=jax.process_index(), count=jax.process_count(), allgather=gather_rows, **kwargs)


def _batch_config(data: DataConfig, **changes) -> BatchConfig:
    fields = dict(batch_size=data.batch_size, seq_len=data.row_len, pack=data.pack, max_segments=data.max_segments,
                  shuffle=data.shuffle, seed=data.seed)
    return BatchConfig(**{**fields, **changes})


def train_batches(dataset: TokenizedDataset, data: DataConfig) -> BatchIterator:
    """The endless, shuffled, resumable training iterator."""
    return BatchIterator(dataset, _batch_config(data))


def one_pass(dataset: TokenizedDataset, data: DataConfig) -> BatchIterator:
    """One unshuffled pass over `dataset` in `data`'s batches (the last one padded, rows masked)."""
    return BatchIterator(dataset, _batch_config(data, shuffle=False, num_epochs=1))


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """What each evaluation reads of a held-out set: `batches`, which hold `examples` of the set's
    `total` examples (fewer when the set has more than `train.eval_batches` batches)."""

    batches: list[dict]
    examples: int
    total: int

    def describe(self) -> str:
        """E.g. "32 of 120 held-out examples" (the console's `eval @ step N` line)."""
        return f"{self.examples} of {self.total} held-out examples"


def held_out_batches(dataset: TokenizedDataset, data: DataConfig, *, max_batches: int) -> HeldOut:
    """The first `max_batches` held-out batches in dataset order (one pass; padding rows masked),
    with how many of the set's examples they hold (all processes' rows, packed rows counted by
    their examples)."""
    out, examples = [], 0
    it = one_pass(dataset, data)
    for batch in it:
        out.append(batch)
        examples += sum(len(row) for row in it.last_global_rows)
        if len(out) == max_batches:
            break
    return HeldOut(out, examples, len(dataset))


def eval_batches(dataset: TokenizedDataset, data: DataConfig, *, max_batches: int) -> list[dict]:
    """The first `max_batches` held-out batches in dataset order (`held_out_batches(...).batches`)."""
    return held_out_batches(dataset, data, max_batches=max_batches).batches


def batches_from(iterator: BatchIterator, extras: Mapping[str, Any], key: str = "data") -> Iterator[dict]:
    """`iterator` moved to the position saved in `extras[key]` (unchanged for a fresh run)."""
    if key in extras:
        iterator.set_state(extras[key])
    return iterator


def device_batch(batch: Mapping[str, Any], mesh, strategy: str) -> dict:
    """The numpy arrays of a host batch placed on the mesh (non-array entries such as `columns` dropped).

    Each device receives only its rows (`rlhf_jax.sharding.shard_batch`).
    """
    arrays = {k: v for k, v in batch.items() if isinstance(v, np.ndarray)}
    return sh.shard_batch(arrays, mesh=mesh, strategy=strategy)


@dataclasses.dataclass(frozen=True)
class RunData:
    """A run's tokenizer and tokenized splits (eval None when `data.eval` is None)."""

    tokenizer: Any
    train: TokenizedDataset
    eval: TokenizedDataset | None


def check_batch_size(dataset: TokenizedDataset | ShardedDataset | None, data: DataConfig, *, mesh=None,
                     strategy: str | None = None, micro_batches: int = 1) -> None:
    """Raise ConfigError when the training set has fewer examples than one global batch (`data.batch_size`),
    or, given the run's `mesh` and `strategy`, when that batch does not split into the mesh's data-parallel
    shards x `micro_batches` (`train.micro_batches`): the step and the evaluations would refuse it only
    once they are built (after the step-0 evaluation has run).

    Epochs run into each other, so a smaller set would fill every batch with copies of its examples.
    """
    if mesh is not None:
        ways = sh.batch_axis_size(mesh, strategy)
        need = ways * micro_batches
        if data.batch_size % need:
            raise ConfigError(f"data.batch_size: batch size {data.batch_size} is not divisible by {need} = {ways} "
                              f"data-parallel shards (mesh {dict(mesh.shape)}, strategy {strategy!r}) x "
                              f"train.micro_batches {micro_batches}; use a multiple of {need}, or change "
                              "train.micro_batches or the mesh")
    if dataset is None or len(dataset) >= data.batch_size:
        return
    hint = " or raise data.num_train" if data.task("train") is not None else ""
    read = f" ({dataset.num_rows} rows read)" if dataset.num_rows != len(dataset) else ""
    raise ConfigError(f"data.batch_size {data.batch_size} is larger than the {len(dataset)} training examples of "
                      f"data.train {data.train}{read}: every batch would repeat examples; use data.batch_size <= "
                      f"{len(dataset)}{hint}")


def load_run_data(config, kind: Kind, *, tokenize: TokenizeConfig | None = None, tokenizer=None) -> RunData:
    """The tokenizer (checked against `config.model`) and both splits of `config.data`, as `kind`
    (tokenized by `tokenize`, default `config.data.tokenize`; `tokenizer`: `data.tokenizer` already
    loaded).

    Raises ConfigError when the training split has fewer examples than `data.batch_size`, or (but for
    prompt runs) when `data.batch_size` does not split into `config.mesh`'s data-parallel shards x
    `train.micro_batches`.
    """
    tokenizer = make_tokenizer(config.data.tokenizer) if tokenizer is None else tokenizer
    check_vocab(tokenizer, config.model)
    train = load_split(config.data, kind=kind, which="train", tokenizer=tokenizer, tokenize=tokenize)
    # Runs that read prompts (RL, online DPO, best-of-n) batch their samples their own way.
    mesh = None if kind == "prompt" else config.mesh.make_mesh()
    check_batch_size(train, config.data, mesh=mesh, strategy=config.mesh.strategy,
                     micro_batches=config.train.micro_batches)
    return RunData(tokenizer, train, load_split(config.data, kind=kind, which="eval", tokenizer=tokenizer,
                                                tokenize=tokenize))
