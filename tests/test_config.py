"""Config composition and `--set` overrides: parsing by type, validation, clear errors, round trips."""

import dataclasses
import json
from typing import Literal

import pytest

from rlhf_jax.config import (
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


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as e:
        override(Root(), ["algorithm.bta=0.2"])
    msg = str(e.value)
    assert "unknown key 'algorithm.bta'" in msg
    assert "Did you mean algorithm.beta" in msg
    assert "algorithm.loss_type: 'sigmoid' | 'ipo' | 'hinge'" in msg
    assert "train.steps: int" in msg and "model.num_layers: int" in msg
    with pytest.raises(ConfigError, match="unknown key 'nosuch'"):
        override(Root(), ["nosuch=1"])
    with pytest.raises(ConfigError, match="'seed' is a value of type int, not a section"):
        override(Root(), ["seed.x=1"])


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
