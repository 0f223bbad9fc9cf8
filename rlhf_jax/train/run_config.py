"""The sections every training run has: `RunConfig` (model, data, mesh, optim, train, checkpoint,
logging) and its `DataConfig`. Each algorithm family's config adds its own sections (`algorithm`,
`rollout`, `rewards`, ...) to `RunConfig`.

Data sources (`data.train`, `data.eval`): a path (`.jsonl`, `.json`, `.parquet`, `.csv`, a saved
Hugging Face dataset or a TFDS directory, see `rlhf_jax.data.sources`), or `synthetic:vowel` /
`synthetic:arithmetic` for the built-in tasks of `rlhf_jax.data.synthetic`, generated with
`data.num_train` / `data.num_eval` rows (evaluation rows from another seed, preference labels
always the gold ones).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

from rlhf_jax.config import (CheckpointConfig, ConfigError, LoggingConfig, TrainConfig, _check_bools,
                             _check_positive_int, check_choice)
from rlhf_jax.data import TokenizeConfig
from rlhf_jax.data.formats import resolve_prompt_template
from rlhf_jax.data.synthetic import ArithmeticTask, VowelTask
from rlhf_jax.models import ModelConfig
from rlhf_jax.models.lora import LoraConfig
from rlhf_jax.models.presets import get_config
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.train.tasks import SYNTHETIC_TASKS, BoundTask

__all__ = ["DataConfig", "RunConfig"]


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
      prompt_template: RL prompt rows only: a text with one `{prompt}` field that each prompt (or its
        last user message) is put into, a name of `rlhf_jax.data.formats.PROMPT_TEMPLATES` ("gsm8k", "math_boxed"); None: prompts as written.
      batch_size: rows (RL: prompts) per step, all hosts together (each host reads batch_size / hosts
        of them). Except in runs that read prompts, it must split into the mesh's data-parallel
        shards x `train.micro_batches`.
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
    prompt_template: str | None = None
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
        try:
            TokenizeConfig(max_len=self.max_len, max_prompt_len=self.max_prompt_len)  # its own checks
        except ValueError as e:
            raise ConfigError(str(e).replace("TokenizeConfig.", "data.")) from None
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"data.seed must be an int >= 0, got {self.seed!r}")
        _check_positive_int("data", "seq_len", self.seq_len, allow_none=True)
        if self.seq_len is not None and self.seq_len < self.max_len:
            raise ConfigError(f"data.seq_len ({self.seq_len}) must be >= data.max_len ({self.max_len}) or None")
        check_choice("data", "truncation", self.truncation, Literal["keep_start", "keep_end"])
        check_choice("data", "string_format", self.string_format, Literal["plain", "chat"])
        check_choice("data", "on_error", self.on_error, Literal["raise", "skip"])
        _check_bools("data", self)
        try:
            resolve_prompt_template(self.prompt_template, "data.prompt_template")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for name, what in (("train", "a path or synthetic:NAME"), ("eval", "a path or synthetic:NAME or None"),
                           ("tokenizer", '"offline" or a tokenizer directory')):
            value = getattr(self, name)
            if value is None and name == "eval":
                continue
            if not isinstance(value, str) or not value.strip():  # e.g. `--set data.train=$TRAIN`, the variable unset
                raise ConfigError(f"data.{name} must be {what}, got {value!r}")
            if name != "tokenizer" and value.startswith("synthetic:") and value[10:] not in SYNTHETIC_TASKS:
                raise ConfigError(f"data.{name}: unknown synthetic task {value!r}; known: "
                                  f"{['synthetic:' + k for k in SYNTHETIC_TASKS]}")

    def task(self, which: Literal["train", "eval"] = "train") -> BoundTask | None:
        """The synthetic task of `data.train` / `data.eval`, or None for a file source."""
        source = self.train if which == "train" else self.eval
        if source is None or not source.startswith("synthetic:"):
            return None
        name = source[len("synthetic:"):]
        spec = SYNTHETIC_TASKS[name]
        return BoundTask(name, spec, getattr(self, spec.field))

    @property
    def tokenize(self) -> TokenizeConfig:
        return TokenizeConfig(max_len=self.max_len, max_prompt_len=self.max_prompt_len,
                              truncation=self.truncation, string_format=self.string_format,
                              prompt_template=self.prompt_template)

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
      lora: train low-rank adapters on a frozen base instead of every weight
        (`rlhf_jax.models.lora.LoraConfig`: rank, alpha, rsLoRA, dropout, targets); the reference of
        DPO, GRPO and PPO is then the base with adapters off. None = full fine-tuning.
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
    lora: LoraConfig | None = None

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ConfigError(f"name must be a non-empty string without '/', got {self.name!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")

    @property
    def run_dir(self) -> str:
        return self.workdir or os.path.join("runs", self.name)
