"""Config composition and `--set` overrides: parsing by type, validation, clear errors, round trips."""

import dataclasses
import json
import math
from typing import Literal

import numpy as np
import pytest

from rlhf_jax.config import (
    ALLOW_NONFINITE,
    CheckpointConfig,
    ConfigError,
    LoggingConfig,
    TrainConfig,
    flat_keys,
    from_dict,
    override,
    parse_assignment,
    to_dict,
)
from rlhf_jax.models import ModelConfig
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.testing import tiny_config


@dataclasses.dataclass(frozen=True, kw_only=True)
class Algo:
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    reference_free: bool = False
    mesh_shape: tuple[int, ...] = (1,)
    max_new_tokens: int | None = None
    name: str = "dpo"

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"algorithm.beta must be > 0, got {self.beta}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Root:
    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=tiny_config)
    algorithm: Algo = Algo()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()


def test_override_parses_each_type_by_annotation():
    cfg = override(Root(), [
        "seed=7", "algorithm.beta=0.25", "algorithm.loss_type=ipo", "algorithm.reference_free=true",
        "algorithm.mesh_shape=2,4", "algorithm.max_new_tokens=16", "model.num_layers=3",
        "checkpoint.init_from=/tmp/x", "train.nonfinite=halt", "algorithm.name=a=b",
    ])
    assert cfg.seed == 7 and isinstance(cfg.seed, int)
    assert cfg.algorithm == Algo(beta=0.25, loss_type="ipo", reference_free=True, mesh_shape=(2, 4),
                                 max_new_tokens=16, name="a=b")
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == tiny_config().hidden_size
    assert cfg.checkpoint.init_from == "/tmp/x"
    assert cfg.train.nonfinite == "halt"
    # The original is untouched (frozen, rebuilt by replace).
    assert Root().algorithm.beta == 0.1


def test_override_none_and_bool_spellings_and_order():
    cfg = override(Root(), ["algorithm.max_new_tokens=8", "algorithm.max_new_tokens=none",
                            "logging.tensorboard=0", "logging.console=No"])
    assert cfg.algorithm.max_new_tokens is None
    assert cfg.logging.tensorboard is False and cfg.logging.console is False
    assert override(Root(), ["algorithm.mesh_shape=(8,)"]).algorithm.mesh_shape == (8,)
    assert override(Root(), ["algorithm.beta=1"]).algorithm.beta == 1.0
    assert isinstance(override(Root(), ["algorithm.beta=1"]).algorithm.beta, float)


def test_unknown_key_suggests_the_close_match_and_lists_only_its_section():
    with pytest.raises(ConfigError) as e:
        override(Root(), ["algorithm.bta=0.2"])
    assert str(e.value).splitlines() == [
        "--set algorithm.bta=0.2: unknown key 'algorithm.bta'. Did you mean algorithm.beta?",
        "Keys of section 'algorithm':",
        "  algorithm.beta: float",
        "  algorithm.loss_type: 'sigmoid' | 'ipo' | 'hinge'",
        "  algorithm.reference_free: bool",
        "  algorithm.mesh_shape: tuple[int, ...]",
        "  algorithm.max_new_tokens: int | None",
        "  algorithm.name: str",
    ]
    # A typo in the section name: the top level's keys, its sections shown as `name.*`.
    with pytest.raises(ConfigError) as e:
        override(Root(), ["trian.steps=5"])
    assert str(e.value).splitlines() == [
        "--set trian.steps=5: unknown key 'trian.steps'. Did you mean train.steps?",
        "Keys of the top level:",
        "  seed: int",
        "  model.*: section (ModelConfig)",
        "  algorithm.*: section (Algo)",
        "  train.*: section (TrainConfig)",
        "  checkpoint.*: section (CheckpointConfig)",
        "  logging.*: section (LoggingConfig)",
    ]
    # The right name in the wrong section points at the section that has it.
    with pytest.raises(ConfigError) as e:
        override(Root(), ["train.beta=0.2"])
    lines = str(e.value).splitlines()
    assert lines[0] == "--set train.beta=0.2: unknown key 'train.beta'. Did you mean algorithm.beta?"
    listed = [f"  {k}: {t}" for k, t in flat_keys(TrainConfig(), "train.").items()]
    assert lines[1:] == ["Keys of section 'train':", *listed]
    assert len(lines) == 2 + len(dataclasses.fields(TrainConfig)) and "  train.steps: int" in lines
    # A nested section of 20 fields lists those 20 and nothing else.
    with pytest.raises(ConfigError) as e:
        override(Root(), ["model.num_layer=3"])
    lines = str(e.value).splitlines()
    assert "Did you mean model.num_layers?" in lines[0]
    assert lines[1] == "Keys of section 'model':"
    assert len(lines) == 2 + len(dataclasses.fields(ModelConfig))
    assert all(line.startswith("  model.") for line in lines[2:])
    with pytest.raises(ConfigError, match=r"unknown key 'nosuch'\.\nKeys of the top level:\n  seed: int\n"):
        override(Root(), ["nosuch=1"])
    with pytest.raises(ConfigError, match="'seed' is a value of type int, not a section.*Did you mean seed"):
        override(Root(), ["seed.x=1"])


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "NaN", "1e999", "-Infinity"])
def test_non_finite_floats_are_refused_at_parse_time_naming_the_key(text):
    with pytest.raises(ConfigError) as e:
        override(Root(), [f"algorithm.beta={text}"])
    assert str(e.value) == f"--set algorithm.beta={text}: algorithm.beta must be a finite number, got '{text}'"
    with pytest.raises(ConfigError, match=f"'model.rope_theta' .*got '{text}'|model.rope_theta must be a finite"):
        override(Root(), [f"model.rope_theta={text}"])


def test_a_field_can_allow_non_finite_floats():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Clip:
        low: float = dataclasses.field(default=-math.inf, metadata=ALLOW_NONFINITE)
        high: float = 1.0
        both: tuple[float, float] = dataclasses.field(default=(0.0, 1.0), metadata=ALLOW_NONFINITE)
        bound: float | None = None

    assert override(Clip(), ["low=-inf"]).low == -math.inf
    assert math.isnan(override(Clip(), ["low=nan"]).low)
    assert override(Clip(), ["both=-inf,inf"]).both == (-math.inf, math.inf)
    with pytest.raises(ConfigError, match="high must be a finite number, got 'inf'"):
        override(Clip(), ["high=inf"])
    # In a union (`float | None`) the refusal is kept, not retried as another type.
    with pytest.raises(ConfigError, match="bound must be a finite number, got 'inf'"):
        override(Clip(), ["bound=inf"])
    assert override(Clip(), ["bound=none"]).bound is None
    # The dict round trip applies the same rule.
    assert from_dict(Clip, {"low": -math.inf}).low == -math.inf
    with pytest.raises(ConfigError, match="high must be a finite number, got inf"):
        from_dict(Clip, {"high": math.inf})
    with pytest.raises(ConfigError, match="bound must be a finite number, got nan"):
        from_dict(Clip, {"bound": math.nan})


@dataclasses.dataclass(frozen=True, kw_only=True)
class WithOptim:
    optim: OptimizerConfig = OptimizerConfig()


@pytest.mark.parametrize("assignment, message", [
    ("optim.learning_rate=inf", "optim.learning_rate must be a finite number, got 'inf'"),
    ("optim.learning_rate=nan", "optim.learning_rate must be a finite number, got 'nan'"),
    ("optim.learning_rate=0", "OptimizerConfig.learning_rate must be > 0, got 0.0"),
    ("optim.weight_decay=inf", "optim.weight_decay must be a finite number, got 'inf'"),
    ("optim.weight_decay=-0.1", "OptimizerConfig.weight_decay must be >= 0, got -0.1"),
    ("optim.max_grad_norm=inf", "optim.max_grad_norm must be a finite number, got 'inf'"),
    ("optim.max_grad_norm=0", "OptimizerConfig.max_grad_norm must be > 0 or None, got 0.0"),
    ("optim.b1=nan", "optim.b1 must be a finite number, got 'nan'"),
    ("optim.b2=1", "OptimizerConfig.b2 must be in [0, 1), got 1.0"),
    ("optim.eps=inf", "optim.eps must be a finite number, got 'inf'"),
    ("optim.eps=-1e-8", "OptimizerConfig.eps must be >= 0, got -1e-08"),
    ("optim.end_learning_rate_ratio=nan", "optim.end_learning_rate_ratio must be a finite number, got 'nan'"),
])
def test_optimizer_values_are_checked_in_one_line_naming_the_key(assignment, message):
    with pytest.raises(ConfigError) as e:
        override(WithOptim(), [assignment])
    assert str(e.value) == f"--set {assignment}: {message}"


@pytest.mark.parametrize("field, value", [
    ("learning_rate", math.inf), ("learning_rate", math.nan), ("weight_decay", math.inf), ("eps", math.nan),
    ("max_grad_norm", math.inf), ("momentum", math.nan), ("b1", -math.inf),
])
def test_optimizer_config_refuses_non_finite_values_built_in_python(field, value):
    with pytest.raises(ConfigError, match=f"^OptimizerConfig.{field} must be a finite number, got {value!r}$"):
        OptimizerConfig(**{field: value})
    with pytest.raises(ConfigError, match=f"^OptimizerConfig.{field} must be a number, got '1'$"):
        OptimizerConfig(**{field: "1"})
    assert OptimizerConfig(max_grad_norm=None).max_grad_norm is None
    assert OptimizerConfig(learning_rate=np.float32(1e-3)).learning_rate == np.float32(1e-3)


def test_wrong_type_names_key_type_and_value():
    with pytest.raises(ConfigError, match=r"wrong type for 'train.steps'.*type int, got '1.5'"):
        override(Root(), ["train.steps=1.5"])
    with pytest.raises(ConfigError, match=r"wrong type for 'algorithm.beta'.*type float, got 'abc'"):
        override(Root(), ["algorithm.beta=abc"])
    with pytest.raises(ConfigError, match=r"algorithm.loss_type.*one of \('sigmoid', 'ipo', 'hinge'\)"):
        override(Root(), ["algorithm.loss_type=bogus"])
    with pytest.raises(ConfigError, match=r"wrong type for 'logging.jsonl'.*bool"):
        override(Root(), ["logging.jsonl=maybe"])
    with pytest.raises(ConfigError, match="'model' is a section; set one of its keys: model.model_type"):
        override(Root(), ["model=big"])


def test_section_validation_runs_and_is_reported():
    with pytest.raises(ConfigError, match="algorithm.beta must be > 0, got -1.0"):
        override(Root(), ["algorithm.beta=-1"])
    with pytest.raises(ConfigError, match="train.steps must be a positive int, got 0"):
        override(Root(), ["train.steps=0"])
    with pytest.raises(ConfigError, match="num_heads .* multiple of num_kv_heads"):
        override(Root(), ["model.num_kv_heads=3"])
    with pytest.raises(ConfigError, match="keep_best > 0 needs checkpoint.best_metric"):
        override(Root(), ["checkpoint.keep_best=1"])


def test_overrides_are_validated_together():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Lengths:
        max_len: int = 128
        max_prompt_len: int = 64

        def __post_init__(self):
            if not self.max_prompt_len < self.max_len:
                raise ValueError(f"max_prompt_len {self.max_prompt_len} must be < max_len {self.max_len}")

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Outer:
        lengths: Lengths | None = Lengths()
        seed: int = 0

    # Each change alone would be invalid on the way; together they are fine.
    assert override(Outer(), ["lengths.max_len=32", "lengths.max_prompt_len=16"]).lengths == Lengths(
        max_len=32, max_prompt_len=16)
    assert override(Outer(), ["seed=1", "seed=2"]).seed == 2
    with pytest.raises(ConfigError, match="--set lengths.max_len=32: max_prompt_len 64 must be < max_len 32"):
        override(Outer(), ["lengths.max_len=32"])
    with pytest.raises(ConfigError, match="sets a key inside the section the first replaces"):
        override(Outer(), ["lengths=none", "lengths.max_len=256"])
    assert override(Outer(), ["lengths=none"]).lengths is None


def test_parse_assignment_requires_equals():
    assert parse_assignment("a.b=c=d") == ("a.b", "c=d")
    assert parse_assignment("a=") == ("a", "")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_assignment("a.b")


def test_flat_keys_lists_leaves_with_types():
    keys = flat_keys(Root())
    assert keys["algorithm.mesh_shape"] == "tuple[int, ...]"
    assert keys["algorithm.max_new_tokens"] == "int | None"
    assert keys["checkpoint.init_from"] == "str | None"
    assert "model" not in keys and "model.rope_scaling" in keys
    assert len([k for k in keys if k.startswith("train.")]) == len(dataclasses.fields(TrainConfig))


def test_dict_round_trip_through_json():
    cfg = override(Root(), ["algorithm.mesh_shape=2,4", "seed=3", "algorithm.loss_type=hinge"])
    data = json.loads(json.dumps(to_dict(cfg)))
    assert data["algorithm"]["mesh_shape"] == [2, 4]
    assert from_dict(Root, data) == cfg
    data["algorithm"]["nope"] = 1
    with pytest.raises(ConfigError, match=r"algorithm.unknown keys \['nope'\]"):
        from_dict(Root, data)
    data = to_dict(cfg)
    data["train"]["steps"] = "ten"
    with pytest.raises(ConfigError, match="train.steps: expected int, got 'ten'"):
        from_dict(Root, data)
