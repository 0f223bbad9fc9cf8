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


def test_a_union_of_sections_is_read_back_as_the_member_that_was_written():
    from rlhf_jax.steps.preference_objectives import DPO, KTO, ORPO, SimPO
    from rlhf_jax.train.dpo import DPOConfig

    for algorithm in (ORPO(beta=0.3), SimPO(beta=2.0, gamma=0.5), KTO(beta=0.2), DPO(beta=0.2, loss_type="ipo")):
        cfg = DPOConfig(name="d", algorithm=algorithm)
        back = from_dict(DPOConfig, json.loads(json.dumps(to_dict(cfg))))
        assert type(back.algorithm) is type(algorithm) and back == cfg
    # A partial dict still goes to the first member that accepts it.
    assert from_dict(DPOConfig, {"name": "d", "algorithm": {"beta": 0.2, "gamma": 1.0}}).algorithm == SimPO(beta=0.2, gamma=1.0)


def test_from_dict_refuses_a_fixed_length_tuple_of_another_length():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Lens:
        pair: tuple[int, int] = (1, 2)

    assert from_dict(Lens, {"pair": [3, 4]}).pair == (3, 4)
    with pytest.raises(ConfigError, match=r"^pair: expected 2 values for tuple\[int, int\], got \[1, 2, 3\]$"):
        from_dict(Lens, {"pair": [1, 2, 3]})
    with pytest.raises(ConfigError, match=r"^pair: expected 2 values for tuple\[int, int\], got \[1\]$"):
        from_dict(Lens, {"pair": [1]})


def test_tuple_values_keep_every_entry():
    assert override(Root(), ["algorithm.mesh_shape=(8,)"]).algorithm.mesh_shape == (8,)
    assert override(Root(), ["algorithm.mesh_shape=[2, 4]"]).algorithm.mesh_shape == (2, 4)
    assert override(Root(), ["algorithm.mesh_shape="]).algorithm.mesh_shape == ()
    assert override(Root(), ["algorithm.mesh_shape=()"]).algorithm.mesh_shape == ()
    with pytest.raises(ConfigError) as e:
        override(Root(), ["algorithm.mesh_shape=2,,4"])
    assert str(e.value) == ("--set algorithm.mesh_shape=2,,4: wrong type for 'algorithm.mesh_shape': an empty entry "
                            "between commas; the key has type tuple[int, ...], got '2,,4'")

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Judge:
        principles: tuple[str, ...] = ()

    # Quoted entries (the JSON list `--print-config` shows, or a Python tuple) are the text in the quotes.
    assert override(Judge(), ['principles=["be kind", "be brief"]']).principles == ("be kind", "be brief")
    assert override(Judge(), ["principles=('be kind', 'be brief')"]).principles == ("be kind", "be brief")
    assert override(Judge(), ["principles=be kind,be brief"]).principles == ("be kind", "be brief")


def test_an_empty_init_from_is_refused_not_a_random_init():
    with pytest.raises(ConfigError) as e:
        override(Root(), ["checkpoint.init_from="])
    assert str(e.value) == ("--set checkpoint.init_from=: checkpoint.init_from must be a path or None (random init), "
                            "got ''")
    assert override(Root(), ["checkpoint.init_from=none"]).checkpoint.init_from is None
    with pytest.raises(ConfigError, match="checkpoint.init_from must be a path or None"):
        CheckpointConfig(init_from=" ")


def test_a_typo_inside_an_optional_section_left_none_suggests_its_key():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Lora:
        rank: int = 8
        alpha: float = 16.0

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class WithLora:
        lora: Lora | None = None

    assert override(WithLora(), ["lora.rank=4"]).lora == Lora(rank=4)
    with pytest.raises(ConfigError) as e:
        override(WithLora(), ["lora.rnak=4"])
    assert str(e.value).splitlines() == [
        "--set lora.rnak=4: unknown key 'lora.rnak'. Did you mean lora.rank?",
        "Keys of section 'lora':", "  lora.rank: int", "  lora.alpha: float",
    ]


def _same(a, b):
    """Equal with the same types all the way down (1 == 1.0 == True and DPO == ORPO's fields are not enough)."""
    if type(a) is not type(b):
        return False
    if dataclasses.is_dataclass(a):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_every_experiment_config_round_trips_through_json_with_its_types():
    import glob
    import os

    from rlhf_jax.cli import experiment_config, load_experiment

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
    paths = sorted(glob.glob(os.path.join(root, "*.py")))
    assert len(paths) >= 19
    for path in paths:
        module, _ = load_experiment(path)
        for arg in (None, "orpo") if os.path.basename(path) == "dpo_tiny.py" else (None,):
            cfg = experiment_config(module, arg, [])
            back = from_dict(type(cfg), json.loads(json.dumps(to_dict(cfg))))
            assert _same(back, cfg), (path, arg)


_SPLIT = ("data.batch_size: batch size {b} is not divisible by {need} = 8 data-parallel shards (mesh {{'data': 8, "
          "'fsdp': 1, 'tensor': 1}}, strategy 'dp') x train.micro_batches {m}; use a multiple of {need}, or change "
          "train.micro_batches or the mesh")


@pytest.mark.parametrize("batch_size,micro_batches,need", [(12, 1, 8), (16, 4, 32)])
def test_a_batch_size_the_mesh_and_micro_batches_do_not_split_is_refused_with_the_data(batch_size, micro_batches,
                                                                                          need):
    """It failed at the first train step (or when the evaluations were placed), after the step-0
    evaluation had compiled and run, with a ShardingError naming neither key; the data load refuses it."""
    from rlhf_jax.train import tiny_stages
    from rlhf_jax.train.data import load_run_data

    config = override(tiny_stages.sft_tiny("split"), ["data.num_train=64", "data.num_eval=16",
                                                      f"data.batch_size={batch_size}",
                                                      f"train.micro_batches={micro_batches}"])
    with pytest.raises(ConfigError) as e:
        load_run_data(config, "sft")
    assert str(e.value) == _SPLIT.format(b=batch_size, need=need, m=micro_batches)
    load_run_data(override(config, [f"data.batch_size={need}"]), "sft")  # a multiple loads
    load_run_data(config, "prompt")  # prompt runs batch their samples their own way


def test_a_prm_batch_size_the_mesh_does_not_split_is_refused_before_its_data_loads():
    """The PRM recipe reads its step data its own way (`prm._load`) and did not check the split."""
    from rlhf_jax.train import prm

    from rlhf_jax.sharding import MeshConfig
    from rlhf_jax.train.run_config import DataConfig

    config = prm.PRMConfig(name="split", mesh=MeshConfig(strategy="dp"),  # the file is missing: refused first
                           data=DataConfig(train="missing/steps.jsonl", eval=None, batch_size=12))
    with pytest.raises(ConfigError) as e:
        prm._load(config)
    assert str(e.value) == _SPLIT.format(b=12, need=8, m=1)


@pytest.mark.parametrize("section,assignment,message", [
    ("data", {"seq_len": math.nan}, "data.seq_len must be a positive int, got nan"),
    ("data", {"seed": -1}, "data.seed must be an int >= 0, got -1"),
    ("run", {"seed": None}, "seed must be an int, got None"),
    ("run", {"seed": 1.5}, "seed must be an int, got 1.5"),
    ("rewards", {"missing_eos_penalty": math.inf}, "rewards.missing_eos_penalty must be a finite number >= 0, got inf"),
    ("rewards", {"missing_eos_penalty": None}, "rewards.missing_eos_penalty must be a finite number >= 0, got None"),
    ("rewards", {"overlong_buffer": -1}, "rewards.overlong_buffer must be a positive int, got -1"),
    ("rewards", {"overlong_buffer": 2.5}, "rewards.overlong_buffer must be a positive int, got 2.5"),
    ("dpo", {"logits_chunk_size": 1.5}, "logits_chunk_size must be a positive int or None, got 1.5"),
])
def test_values_of_the_wrong_type_or_range_set_in_an_experiment_module_are_refused(section, assignment, message):
    """Python values an experiment module writes (the command line parses by type first): each was
    accepted and failed later in numpy/JAX without the key (data.seed, seed), ran with a wrong value
    (seq_len nan, an infinite penalty), or was used only by an unused reward (overlong_buffer)."""
    from rlhf_jax.rewards.registry import RewardConfig
    from rlhf_jax.train.dpo import DPOConfig
    from rlhf_jax.train.run_config import DataConfig, RunConfig

    make = {"data": DataConfig, "run": lambda **kw: RunConfig(name="x", **kw), "rewards": RewardConfig,
            "dpo": lambda **kw: DPOConfig(name="x", **kw)}[section]
    with pytest.raises(ConfigError) as e:
        make(**assignment)
    assert str(e.value) == message


@pytest.mark.parametrize("make,message", [
    (lambda: _ppo_config(kl_horizon=500.0),
     "algorithm.kl_horizon=500.0 has no effect unless algorithm.kl_target is set (the adaptive KL controller): "
     "set that, or leave algorithm.kl_horizon at its default (10000.0)"),
    (lambda: _rollout_config(max_sampling_rounds=8),
     "rollout.max_sampling_rounds=8 has no effect unless rollout.dynamic_sampling is true: set that, or leave "
     "rollout.max_sampling_rounds at its default (4)"),
    (lambda: _reward_config(functions=("even_fraction",), missing_eos_penalty=2.0),
     "rewards.missing_eos_penalty=2.0 has no effect unless rewards.functions holds \"missing_eos\": set that, or "
     "leave rewards.missing_eos_penalty at its default (1.0)"),
])
def test_a_setting_of_a_mode_that_is_off_is_refused(make, message):
    """Each was silently ignored: a horizon without the adaptive controller it tunes, a rounds bound
    without dynamic sampling, a penalty without the reward that pays it."""
    with pytest.raises(ConfigError) as e:
        make()
    assert str(e.value) == message


def test_a_setting_of_a_mode_that_is_on_or_left_at_its_default_passes():
    assert _ppo_config(kl_target=0.1, kl_horizon=500.0).kl_horizon == 500.0
    assert _ppo_config(kl_horizon=10_000.0).kl_horizon == 10_000.0  # the default, written out: no effect either way
    assert _rollout_config(dynamic_sampling=True, max_sampling_rounds=8).max_sampling_rounds == 8
    assert _reward_config(functions=("missing_eos",), missing_eos_penalty=2.0).missing_eos_penalty == 2.0


def _ppo_config(**kwargs):
    from rlhf_jax.steps import PPOConfig

    return PPOConfig(**kwargs)


def _rollout_config(**kwargs):
    from rlhf_jax.train.rollouts import RolloutConfig

    return RolloutConfig(**kwargs)


def _reward_config(**kwargs):
    from rlhf_jax.rewards.registry import RewardConfig

    return RewardConfig(**kwargs)


def _data_config(**kwargs):
    from rlhf_jax.train.run_config import DataConfig

    return DataConfig(**kwargs)


@pytest.mark.parametrize("make,message", [
    (lambda: CheckpointConfig(resume="false"), "checkpoint.resume must be true or false, got 'false'"),
    (lambda: LoggingConfig(jsonl=0.0), "logging.jsonl must be true or false, got 0.0"),
    (lambda: _data_config(shuffle="no"), "data.shuffle must be true or false, got 'no'"),
    (lambda: TrainConfig(eval_every=True), "train.eval_every must be an int >= 0, got True"),
    (lambda: CheckpointConfig(every=True), "checkpoint.every must be an int >= 0, got True"),
])
def test_a_bool_field_given_another_value_in_python_is_refused(make, message):
    """`resume="false"` (or any non-empty string, or 2) read as true: the setting was silently reversed;
    and a bool where a count belongs (`eval_every=True`) ran as 1."""
    with pytest.raises(ConfigError) as e:
        make()
    assert str(e.value) == message


@pytest.mark.parametrize("field,value,message", [
    ("kl_coef", math.inf, "algorithm.kl_coef must be a finite number >= 0, got inf"),
    ("entropy_coef", "0.01", "algorithm.entropy_coef must be a finite number >= 0, got '0.01'"),
    ("temperature", math.inf, "algorithm.temperature must be a finite number > 0, got inf"),
    ("vf_coef", math.inf, "algorithm.vf_coef must be a finite number >= 0, got inf"),
])
def test_policy_gradient_coefficients_must_be_finite(field, value, message):
    """A Python inf (the command line refuses it) made every loss non-finite: the NaN/Inf guard then
    skipped every update and the run trained nothing; a string failed on a comparison, unnamed."""
    from rlhf_jax.steps import GRPOConfig, PPOConfig

    cls = PPOConfig if field == "vf_coef" else GRPOConfig
    with pytest.raises(ConfigError) as e:
        cls(**{field: value})
    assert str(e.value) == message


@pytest.mark.parametrize("make,message", [
    (lambda: _objective("DPO", beta=math.inf), "algorithm.beta (DPO) must be a finite number, got inf"),
    (lambda: _objective("SimPO", nll_weight=math.inf), "algorithm.nll_weight (SimPO) must be a finite number, got inf"),
    (lambda: _objective("KTO", desirable_weight="1"),
     "algorithm.desirable_weight (KTO) must be a finite number, got '1'"),
    (lambda: _sample_eval(temperature=math.inf), "sampling.temperature must be a finite number > 0, got inf"),
])
def test_preference_objective_coefficients_must_be_finite_numbers(make, message):
    with pytest.raises(ConfigError) as e:
        make()
    assert str(e.value) == message


def _objective(name, **kwargs):
    from rlhf_jax import steps

    return getattr(steps, name)(**kwargs)


def _sample_eval(**kwargs):
    from rlhf_jax.train.dpo import SampleEvalConfig

    return SampleEvalConfig(**kwargs)


@pytest.mark.parametrize("assignment,message", [
    ("data.train=", "data.train must be a path or synthetic:NAME, got ''"),
    ("data.eval= ", "data.eval must be a path or synthetic:NAME or None, got ' '"),
    ("data.tokenizer=", "data.tokenizer must be \"offline\" or a tokenizer directory, got ''"),
])
def test_an_empty_data_source_or_tokenizer_is_refused_with_the_config(assignment, message):
    """`--set data.train=$TRAIN` with the variable unset: it failed when the data was read, the
    tokenizer's without the key."""
    from rlhf_jax.train.run_config import RunConfig

    with pytest.raises(ConfigError) as e:
        override(RunConfig(name="x"), [assignment])
    assert str(e.value) == f"--set {assignment}: {message}"
    assert override(RunConfig(name="x"), ["data.eval=none"]).data.eval is None
