"""What the SFT, reward-model and DPO drivers share: the run config, data, initial weights, state.

`RunConfig` composes the per-concern sections (model, data, mesh, optim, train loop, checkpoint,
logging); each family adds its `algorithm` section. The helpers here turn those sections into a
tokenizer, tokenized datasets and batch iterators, initial parameters (random, a Hugging Face
directory, or an rlhf-jax checkpoint) and a sharded `TrainState`, fresh or restored, so that every
driver is a short sequence of calls.

Data sources (`data.train`, `data.eval`): a path (`.jsonl`, `.json`, `.parquet`, `.csv`, a saved
Hugging Face dataset or a TFDS directory, see `rlhf_jax.data.sources`), or `synthetic:vowel` /
`synthetic:arithmetic` for the built-in tasks of `rlhf_jax.data.synthetic`, generated with
`data.num_train` / `data.num_eval` rows (evaluation rows from another seed, preference labels
always the gold ones).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import sharding as sh
from rlhf_jax.checkpoint import CheckpointMismatchError, is_checkpoint_dir, load_params
from rlhf_jax.config import CheckpointConfig, ConfigError, LoggingConfig, TrainConfig, check_choice
from rlhf_jax.data import BatchConfig, BatchIterator, TokenizeConfig, TokenizedDataset, load_dataset, load_tokenizer
from rlhf_jax.data.synthetic import ArithmeticTask, VowelTask
from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.models.heads import init_scalar_head
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.state import TrainState, abstract_train_state, create_train_state, train_state_from_params
from rlhf_jax.steps.common import model_state_shardings
from rlhf_jax.models.presets import get_config
from rlhf_jax.train.loop import RunDir

__all__ = [
    "DataConfig",
    "RunConfig",
    "SYNTHETIC_TASKS",
    "synthetic_task",
    "make_tokenizer",
    "load_split",
    "train_batches",
    "eval_batches",
    "initial_params",
    "init_or_restore",
    "save_items",
    "batches_from",
    "device_batch",
    "check_vocab",
]

Kind = Literal["sft", "preference", "prompt"]

SYNTHETIC_TASKS = ("vowel", "arithmetic")

# (task, kind) -> rows(task object, n, seed, label_noise); the held-out split uses another seed.
_SYNTHETIC_ROWS: dict[tuple[str, str], Callable[[Any, int, int, float], list[dict]]] = {
    ("vowel", "sft"): lambda task, n, seed, noise: task.sft_rows(n, seed=seed),
    ("vowel", "preference"): lambda task, n, seed, noise: task.preference_rows(n, seed=seed, label_noise=noise),
    ("vowel", "prompt"): lambda task, n, seed, noise: task.prompt_rows(n, seed=seed),
    ("arithmetic", "sft"): lambda task, n, seed, noise: task.sft_rows(n, seed=seed),
    ("arithmetic", "prompt"): lambda task, n, seed, noise: task.prompt_rows(n, seed=seed),
}
_EVAL_SEED_OFFSET = 1_000_003


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where examples come from and how they become fixed-shape batches.

    Attributes:
      train: the training source: a path or `synthetic:vowel` / `synthetic:arithmetic`.
      eval: the held-out source (same forms), or None for no evaluation data.
      split, eval_split: the split of a saved Hugging Face `DatasetDict` or TFDS directory.
      num_train, num_eval: rows generated for synthetic sources.
      label_noise: share of synthetic training preference labels flipped (held-out labels are gold).
      tokenizer: "offline" (the built-in character tokenizer) or a local tokenizer directory.
      max_len: tokens per sequence (prompt + completion), longer ones truncated.
      max_prompt_len: prompt tokens kept (None: only `max_len` applies).
      truncation: "keep_end" or "keep_start" (TRL's meaning).
      string_format: "plain" text or "chat" (string prompts/completions rendered with the template).
      batch_size: rows per step on this host (global batch = this x hosts).
      seq_len: tokens per row (default `max_len`; larger rows hold more packed examples).
      pack: pack several examples per row (segment ids; attention never crosses them).
      max_segments: the most examples per packed row.
      shuffle: visit each epoch in a seeded random order.
      seed: the shuffling seed (and the synthetic generator's).
      on_error: "raise" at the first bad row (naming file and line) or "skip" and report bad rows.
      vowel: the knobs of the `synthetic:vowel` task (its gold reward and generators).
      arithmetic: the knobs of the `synthetic:arithmetic` task.
    """

    train: str = "synthetic:vowel"
    eval: str | None = "synthetic:vowel"
    split: str | None = None
    eval_split: str | None = None
    num_train: int = 4096
    num_eval: int = 256
    label_noise: float = 0.0
    tokenizer: str = "offline"
    max_len: int = 48
    max_prompt_len: int | None = None
    truncation: Literal["keep_start", "keep_end"] = "keep_end"
    string_format: Literal["plain", "chat"] = "plain"
    batch_size: int = 32
    seq_len: int | None = None
    pack: bool = False
    max_segments: int = 4
    shuffle: bool = True
    seed: int = 0
    on_error: Literal["raise", "skip"] = "raise"
    vowel: VowelTask = VowelTask()
    arithmetic: ArithmeticTask = ArithmeticTask()

    def __post_init__(self):
        for name in ("num_train", "num_eval", "batch_size", "max_segments"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"data.{name} must be a positive int, got {value!r}")
        if not 0 <= self.label_noise <= 0.5:
            raise ConfigError(f"data.label_noise must be in [0, 0.5], got {self.label_noise!r}")
        if self.seq_len is not None and self.seq_len < self.max_len:
            raise ConfigError(f"data.seq_len ({self.seq_len}) must be >= data.max_len ({self.max_len}) or None")
        check_choice("data", "truncation", self.truncation, Literal["keep_start", "keep_end"])
        check_choice("data", "string_format", self.string_format, Literal["plain", "chat"])
        check_choice("data", "on_error", self.on_error, Literal["raise", "skip"])
        for name in ("train", "eval"):
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("synthetic:") and value[10:] not in SYNTHETIC_TASKS:
                raise ConfigError(f"data.{name}: unknown synthetic task {value!r}; known: "
                                  f"{['synthetic:' + k for k in SYNTHETIC_TASKS]}")
        TokenizeConfig(max_len=self.max_len, max_prompt_len=self.max_prompt_len)  # its own checks

    @property
    def tokenize(self) -> TokenizeConfig:
        return TokenizeConfig(max_len=self.max_len, max_prompt_len=self.max_prompt_len,
                              truncation=self.truncation, string_format=self.string_format)

    @property
    def row_len(self) -> int:
        """Tokens per batch row."""
        return self.seq_len or self.max_len


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The sections every training run has; a family's config adds its `algorithm` section.

    Attributes:
      name: the run's name (default directory `runs/<name>`).
      workdir: the run directory; None = `runs/<name>`. Re-running with the same directory resumes.
      seed: parameter initialization and step randomness.
      model: the architecture (`rlhf_jax.models.ModelConfig`).
      data: sources, tokenization and batching.
      mesh: device mesh shape and sharding strategy.
      optim: optimizer, schedule, clipping.
      train: steps, evaluation interval, NaN/Inf policy.
      checkpoint: save interval, retention, initial weights, resume.
      logging: console, JSONL, TensorBoard, wandb.
    """

    name: str
    workdir: str | None = None
    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=lambda: get_config("tiny"))
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ConfigError(f"name must be a non-empty string without '/', got {self.name!r}")

    @property
    def run_dir(self) -> str:
        return self.workdir or os.path.join("runs", self.name)


# ----------------------------------------------------------------------------------------------- data



def synthetic_task(data: DataConfig, source: str | None) -> Any:
    """The task object (`data.vowel` or `data.arithmetic`) of a `synthetic:NAME` source; None for files."""
    if source is None or not source.startswith("synthetic:"):
        return None
    return {"vowel": data.vowel, "arithmetic": data.arithmetic}[source[len("synthetic:"):]]


def make_tokenizer(spec: str):
    """The tokenizer of `data.tokenizer`: "offline" or a local directory (FileNotFoundError otherwise)."""
    if spec == "offline":
        from rlhf_jax.data.offline_tokenizer import offline_tokenizer  # noqa: PLC0415

        return offline_tokenizer()
    return load_tokenizer(spec)


def load_split(data: DataConfig, *, kind: Kind, which: Literal["train", "eval"], tokenizer) -> TokenizedDataset | None:
    """Read, validate and tokenize the train or eval source (None when `data.eval` is None).

    Raises:
      FileNotFoundError: the source path does not exist (named with its config key), raised before
        any model is built.
      DataError: a bad row (file, line and problem), unless `data.on_error="skip"`.
    """
    source = data.train if which == "train" else data.eval
    if source is None:
        return None
    split = data.split if which == "train" else data.eval_split
    task = synthetic_task(data, source)
    if task is not None:
        name = source[len("synthetic:"):]
        make = _SYNTHETIC_ROWS.get((name, kind))
        if make is None:
            raise ConfigError(f"data.{which}: {source} has no {kind!r} data; it has "
                              f"{sorted(k for t, k in _SYNTHETIC_ROWS if t == name)}")
        n, seed = (data.num_train, data.seed) if which == "train" else (data.num_eval, data.seed + _EVAL_SEED_OFFSET)
        rows = make(task, n, seed, data.label_noise if which == "train" else 0.0)
        return load_dataset(rows, kind=kind, tokenizer=tokenizer, config=data.tokenize, on_error=data.on_error)
    if not os.path.exists(source):
        raise FileNotFoundError(f"data.{which}: {source} does not exist")
    return load_dataset(source, kind=kind, tokenizer=tokenizer, config=data.tokenize, on_error=data.on_error,
                        split=split)


def train_batches(dataset: TokenizedDataset, data: DataConfig) -> BatchIterator:
    """The endless, shuffled, resumable training iterator."""
    return BatchIterator(dataset, BatchConfig(batch_size=data.batch_size, seq_len=data.row_len, pack=data.pack,
                                              max_segments=data.max_segments, shuffle=data.shuffle, seed=data.seed))


def eval_batches(dataset: TokenizedDataset, data: DataConfig, *, max_batches: int) -> list[dict]:
    """The first `max_batches` held-out batches in dataset order (one pass; padding rows masked)."""
    it = BatchIterator(dataset, BatchConfig(batch_size=data.batch_size, seq_len=data.row_len, pack=data.pack,
                                            max_segments=data.max_segments, shuffle=False, num_epochs=1))
    out = []
    for batch in it:
        out.append(batch)
        if len(out) == max_batches:
            break
    return out


def device_batch(batch: Mapping[str, Any], mesh, strategy: str) -> dict:
    """The numpy arrays of a host batch placed on the mesh (non-array entries such as `columns` dropped).

    Each device receives only its rows; in a multi-host run every host passes its own rows and the
    global batch is their concatenation (`rlhf_jax.sharding.shard_batch`).
    """
    arrays = {k: v for k, v in batch.items() if isinstance(v, np.ndarray)}
    return sh.shard_batch(arrays, mesh=mesh, strategy=strategy)


def check_vocab(tokenizer, model_config: ModelConfig) -> None:
    """Raise ConfigError when the tokenizer has ids the model's embedding cannot hold."""
    n = len(tokenizer)
    if n > model_config.vocab_size:
        raise ConfigError(f"the tokenizer has {n} ids but model.vocab_size is {model_config.vocab_size}; "
                          "use a model whose vocabulary covers the tokenizer")


# -------------------------------------------------------------------------------------------- weights

_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "tie_word_embeddings", "attention_bias", "qk_norm")


def _check_same_shape(ours: ModelConfig, theirs: ModelConfig, source: str) -> None:
    diffs = [f"model.{f}: {source} has {getattr(theirs, f)!r}, this run {getattr(ours, f)!r}"
             for f in _SHAPE_FIELDS if getattr(ours, f) != getattr(theirs, f)]
    if diffs:
        raise CheckpointMismatchError(f"checkpoint.init_from={source} does not match the run's model:\n  "
                                      + "\n  ".join(diffs))


def initial_params(model: CausalLM, init_from: str, *, rng: jax.Array, mesh=None, strategy: str | None = None) -> Any:
    """Parameters of `model` read from `init_from` (a Hugging Face directory or an rlhf-jax checkpoint).

    A reward model (`head="scalar"`) started from a language model keeps the backbone, drops the
    LM head and gets a fresh scalar head (`init_scalar_head`); the other direction keeps the
    backbone and needs `tie_word_embeddings`. Shapes are checked before any array is read.

    Args:
      model: the model the parameters are for.
      init_from: a Hugging Face model directory or an rlhf-jax checkpoint root.
      rng: key of a fresh scalar head.
      mesh, strategy: when given, every parameter is read straight into its sharding on `mesh`
        (no device ever holds a whole parameter it should hold a slice of).
    Raises:
      FileNotFoundError: `init_from` does not exist.
      CheckpointMismatchError: the source's architecture differs from `model.config`.
    """
    from rlhf_jax.checkpoint import Checkpointer, read_model_config  # noqa: PLC0415
    from rlhf_jax.config import from_dict  # noqa: PLC0415
    from rlhf_jax.models.hf import config_from_hf, load_hf  # noqa: PLC0415

    def placed(source_model: CausalLM):
        abstract = source_model.abstract_params()
        if mesh is None:
            return abstract, None
        shardings = sh.param_shardings(abstract, source_model.logical_axes, mesh=mesh, strategy=strategy)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            shardings), shardings

    if not os.path.exists(init_from):
        raise FileNotFoundError(f"checkpoint.init_from: {init_from} does not exist")
    if is_checkpoint_dir(init_from):
        saved = read_model_config(init_from)
        source_config = model.config if saved is None else from_dict(ModelConfig, saved)
        _check_same_shape(model.config, source_config, init_from)
        with Checkpointer(init_from, read_only=True) as ckpt:
            keys = ckpt.item_shapes("params")
        source_head = "scalar" if "score" in keys else "lm"
        source = CausalLM(model.config.replace(param_dtype=source_config.param_dtype), head=source_head)
        params = load_params(init_from, placed(source)[0], model_config=model.config)
    elif os.path.isfile(os.path.join(init_from, "config.json")):
        source_config = config_from_hf(init_from)
        _check_same_shape(model.config, source_config, init_from)
        source_head = "scalar" if _hf_is_sequence_classifier(init_from) else "lm"
        source = CausalLM(model.config, head=source_head)
        _, params = load_hf(init_from, dtype=model.config.param_dtype, shardings=placed(source)[1])
    else:
        raise FileNotFoundError(f"checkpoint.init_from: {init_from} is neither a Hugging Face model directory "
                                "(config.json) nor an rlhf-jax checkpoint directory")
    params = dict(params)
    if model.head == "scalar" and "score" not in params:
        params.pop("lm_head", None)
        params["score"] = init_scalar_head(model.config, rng)
    elif model.head == "lm" and "score" in params:
        params.pop("score")
        if not model.config.tie_word_embeddings:
            raise CheckpointMismatchError(f"checkpoint.init_from={init_from} is a reward model (no LM head); a "
                                          "policy can start from it only with tie_word_embeddings")
    dtype = model.config.jnp_param_dtype
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _hf_is_sequence_classifier(path: str) -> bool:
    """Whether a Hugging Face directory's config.json declares a `*ForSequenceClassification` model."""
    import json  # noqa: PLC0415

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        architectures = json.load(f).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def save_items(state: TrainState) -> dict[str, Any]:
    """The checkpoint items of a `TrainState`: `params` apart (so they load alone) and the rest."""
    return {"params": state.params, "train": {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}}


def init_or_restore(model: CausalLM, tx: optax.GradientTransformation, *, config: RunConfig, mesh,
                    run: RunDir) -> tuple[TrainState, int, dict]:
    """The run's `TrainState`: restored from its latest checkpoint, else initialized and placed.

    Fresh runs start from `checkpoint.init_from` when set, else from random weights; both are
    created directly in the strategy's shardings. A restore reads every array straight into its
    sharding after checking shapes against the model.

    Returns:
      `(state, start_step, extras)`; `extras` holds the checkpoint's host state (e.g. the data
      iterator's), empty for a fresh run.
    """
    strategy = config.mesh.strategy
    shardings = model_state_shardings(model, tx, mesh=mesh, strategy=strategy)
    if run.restore_step is not None:
        abstract = abstract_train_state(model.init, tx)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        items, extras = run.checkpointer.restore(save_items(target), step=run.restore_step)
        train = items["train"]
        state = TrainState(train["step"], items["params"], train["opt_state"], train["rng"])
        return state, int(jax.device_get(state.step)), extras
    if config.checkpoint.init_from:
        params = initial_params(model, config.checkpoint.init_from, rng=jax.random.key(config.seed), mesh=mesh,
                                strategy=strategy)
        state = train_state_from_params(params, tx, rng=config.seed, logical_axes=model.logical_axes, mesh=mesh,
                                        strategy=strategy)
    else:
        state = create_train_state(model.init, tx, rng=config.seed, logical_axes=model.logical_axes, mesh=mesh,
                                   strategy=strategy)
    return state, 0, {}


def batches_from(iterator: BatchIterator, extras: Mapping[str, Any]) -> Iterator[dict]:
    """`iterator` moved to the position saved in `extras["data"]` (unchanged for a fresh run)."""
    if "data" in extras:
        iterator.set_state(extras["data"])
    return iterator
