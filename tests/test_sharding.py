"""Meshes, strategies as rule tables, parameter / batch placement and the sharding lint."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import sharding as sh
from rlhf_jax.sharding_lint import format_lint, lint
from rlhf_jax.models import CausalLM
from rlhf_jax.testing import tiny_config

LM = CausalLM(tiny_config())  # embed 256x64, q_proj [2, 64, 4, 16], k/v [2, 64, 2, 16], mlp 128


def test_make_mesh_fills_standard_axes_and_minus_one():
    mesh = sh.make_mesh({"fsdp": 4, "data": -1})
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(sh.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    custom = sh.make_mesh({"data": 2, "expert": 4})
    assert custom.axis_names == ("data", "fsdp", "tensor", "expert")


@pytest.mark.parametrize("shape, match", [
    ({"data": 3}, "has 3 devices but 8 are available"),
    ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
    ({"data": -1, "fsdp": 3}, "cannot fill axis 'data'"),
    ({"data": 0}, "positive size"),
])
def test_make_mesh_rejects_shapes_that_do_not_match_the_devices(shape, match):
    with pytest.raises(sh.ShardingError, match=match):
        sh.make_mesh(shape)


def test_mesh_config_validates_and_builds():
    config = sh.MeshConfig(fsdp=2, tensor=2, strategy="fsdp_tp")
    assert dict(config.make_mesh().shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(sh.ShardingError, match="MeshConfig.tensor"):
        sh.MeshConfig(tensor=0)
    with pytest.raises(sh.ShardingError, match="unknown sharding strategy 'zero3'"):
        sh.MeshConfig(strategy="zero3")
    for bad in (-2, True, 2.0):
        with pytest.raises(sh.ShardingError, match=rf"MeshConfig.fsdp must be a positive int or -1, got {bad!r}"):
            sh.MeshConfig(fsdp=bad)
    # data defaults to -1: fsdp=-1 alone names both and says how to give fsdp the remaining devices.
    with pytest.raises(sh.ShardingError, match=r"got data=-1, fsdp=-1; set data to a size \(e.g. data=1\)"):
        sh.MeshConfig(fsdp=-1)
    assert dict(sh.MeshConfig(data=1, fsdp=-1).make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(sh.MeshConfig(data=2, tensor=-1).make_mesh().shape) == {"data": 2, "fsdp": 1, "tensor": 4}


def test_registry_refuses_duplicates_and_unknown_names():
    with pytest.raises(sh.ShardingError, match="already registered"):
        sh.register_strategy(sh.Strategy(name="fsdp", rules={}))
    with pytest.raises(sh.ShardingError, match="registered: \\['dp', 'fsdp', 'fsdp_tp', 'tp'"):
        sh.get_strategy("nope")
    assert {"dp", "fsdp", "tp", "fsdp_tp"} <= set(sh.strategy_names())


def test_strategy_naming_an_unknown_mesh_axis_is_an_error():
    strategy = sh.Strategy(name="experts", rules={"mlp": "expert"})
    with pytest.raises(sh.ShardingError, match=r"names mesh axes \['expert'\] that the mesh lacks"):
        sh.param_shardings(LM.abstract_params(), LM.logical_axes, mesh=sh.make_mesh(), strategy=strategy)
    issues = lint(LM.abstract_params(), LM.logical_axes, mesh=sh.make_mesh(), strategy=strategy)
    assert [i.kind for i in issues] == ["unknown_axis"]


# Hand-derived specs: logical axes of q_proj are (layers, embed, q_heads, head_dim), of embed (vocab, embed).
@pytest.mark.parametrize("strategy, shape, q_proj, embed, down_proj", [
    ("dp", {"data": 8}, P(), P(), P()),
    ("fsdp", {"data": 2, "fsdp": 4}, P(None, "fsdp"), P(None, "fsdp"), P(None, None, "fsdp")),
    ("tp", {"data": 4, "tensor": 2}, P(None, None, "tensor"), P("tensor"), P(None, "tensor")),
    ("fsdp_tp", {"data": 2, "fsdp": 2, "tensor": 2}, P(None, "fsdp", "tensor"), P("tensor", "fsdp"),
     P(None, "tensor", "fsdp")),
])
def test_param_specs_follow_the_rule_tables(strategy, shape, q_proj, embed, down_proj):
    shardings = sh.param_shardings(LM.abstract_params(), LM.logical_axes, mesh=sh.make_mesh(shape), strategy=strategy)
    assert shardings["layers"]["attn"]["q_proj"].spec == q_proj
    assert shardings["embed"].spec == embed
    assert shardings["layers"]["mlp"]["down_proj"].spec == down_proj
    assert shardings["layers"]["input_norm"]["scale"].spec == (P(None, "fsdp") if "fsdp" in strategy else P())


def test_a_mesh_axis_is_used_once_per_array_and_size_one_axes_are_dropped():
    strategy = sh.Strategy(name="greedy", rules={"embed": "tensor", "mlp": ("tensor", "fsdp")})
    mesh = sh.make_mesh({"fsdp": 4, "tensor": 2})
    spec, problems = sh.partition_spec(("layers", "embed", "mlp"), (2, 64, 128), mesh=mesh, strategy=strategy)
    assert spec == P(None, "tensor", "fsdp") and problems == []
    spec, _ = sh.partition_spec(("embed", "mlp"), (64, 128), mesh=sh.make_mesh({"data": 8}), strategy=strategy)
    assert spec == P()


def test_indivisible_dimensions_are_listed_before_compiling():
    mesh = sh.make_mesh({"data": 2, "tensor": 4})
    with pytest.raises(sh.ShardingError) as err:
        sh.param_shardings(LM.abstract_params(), LM.logical_axes, mesh=mesh, strategy="tp")
    message = str(err.value)
    assert "layers/attn/k_proj: dimension 2 (kv_heads, size 2) is not divisible by mesh axes ('tensor',)" in message
    assert "layers/attn/v_proj" in message and "q_proj" not in message


def test_lint_reports_replicated_parameters_and_unused_axes():
    # Only the MLP is split: the 64 KiB embedding and LM head stay whole although tensor = 2.
    strategy = sh.Strategy(name="mlp_only", rules={"mlp": "tensor"}, batch_axes=("data",))
    mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    issues = lint(LM.abstract_params(), LM.logical_axes, mesh=mesh, strategy=strategy,
                     replicated_threshold_bytes=60 * 1024)
    found = {(i.kind, i.where) for i in issues}
    assert found == {("replicated", "embed"), ("replicated", "lm_head"), ("unused_axis", "mesh axis fsdp")}
    assert all(i.severity == "warning" for i in issues)
    assert "0.1 MiB (256, 64)" in str(next(i for i in issues if i.where == "embed"))
    assert lint(LM.abstract_params(), LM.logical_axes, mesh=mesh, strategy="fsdp_tp") == []
    assert format_lint([]) == "sharding lint: clean"


def test_batch_sharding_and_divisibility():
    mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sh.batch_sharding(mesh, "fsdp_tp").spec == P(("data", "fsdp"))
    assert sh.batch_axis_size(mesh, "tp") == 4
    batch = {"tokens": np.zeros((8, 5), np.int32), "loss_mask": np.ones((8, 5), np.int32)}
    assert sh.check_batch(batch, mesh=mesh, strategy="fsdp", micro_batches=2) == 8
    with pytest.raises(sh.ShardingError, match=r"batch size 8 \(batch\['tokens'\]\) is not divisible by 12"):
        sh.check_batch(batch, mesh=sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), strategy="dp", micro_batches=3)
    with pytest.raises(sh.ShardingError, match=r"batch\['loss_mask'\] has leading size 4"):
        sh.check_batch({"tokens": batch["tokens"], "loss_mask": batch["loss_mask"][:4]}, mesh=mesh, strategy="dp")


def test_shard_batch_puts_only_its_rows_on_each_device():
    mesh = sh.make_mesh({"data": 8})
    tokens = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
    placed = sh.shard_batch({"tokens": tokens}, mesh=mesh, strategy="dp")["tokens"]
    shards = sorted(placed.addressable_shards, key=lambda s: s.index[0].start)
    assert len(shards) == 8 and all(s.data.shape == (2, 3) for s in shards)
    np.testing.assert_array_equal(np.asarray(shards[3].data), tokens[6:8])


def test_constrain_activations_splits_the_batch_only_inside_a_context():
    mesh = sh.make_mesh({"data": 2, "fsdp": 4})
    x = np.ones((8, 3, 4), np.float32)
    f = jax.jit(lambda a: sh.constrain_activations(a) * 2)
    with sh.activation_sharding(mesh, "fsdp"):
        out = f(x)
        odd = jax.jit(lambda a: sh.constrain_activations(a) * 2)(np.ones((6, 3), np.float32))
    assert out.sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in out.addressable_shards} == {(1, 3, 4)}
    assert len(odd.sharding.device_set) == 1  # 6 rows do not split 8 ways: left on one device
    y = np.ones((8, 2), np.float32)
    assert sh.constrain_activations(y) is y  # no context: identity
    with pytest.raises(sh.ShardingError, match="names mesh axes"):
        with sh.activation_sharding(mesh, sh.Strategy(name="x", rules={}, batch_axes=("expert",))):
            pass


def test_step_makers_warn_about_lint_findings():
    from rlhf_jax.optim import OptimizerConfig
    from rlhf_jax.steps import SFT_KEYS, jit_model_step, make_sft_step

    strategy = sh.Strategy(name="mlp_only_warn", rules={"mlp": "tensor"}, batch_axes=("data",))
    update = make_sft_step(LM, OptimizerConfig())
    with pytest.warns(UserWarning, match="unused_axis|splits neither"):
        jit_model_step(update, LM, OptimizerConfig(), mesh=sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
                       strategy=strategy, batch_keys=SFT_KEYS)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rules={"embed": 3}), r"rule 'embed': expected a mesh axis name, a sequence of them or None, got 3"),
    (dict(rules={None: "fsdp"}), r"rule keys must be logical axis names .* got None"),
    (dict(rules={"embed": ""}), r"rule 'embed': a mesh axis name is empty"),
    (dict(batch_axes=""), r"batch_axes: a mesh axis name is empty"),
])
def test_strategy_refuses_malformed_rules(kwargs, message):
    with pytest.raises(sh.ShardingError, match=message):
        sh.Strategy(name="bad", **kwargs)


def test_lint_names_a_rule_for_a_logical_axis_no_parameter_has():
    mesh = sh.make_mesh({"fsdp": 8, "data": 1})
    typo = sh.Strategy(name="typo", rules={"embd": "fsdp"})
    # The rule splits nothing: every parameter is replicated (the placement itself is valid) ...
    shardings = sh.param_shardings(LM.abstract_params(), LM.logical_axes, mesh=mesh, strategy=typo)
    assert all(s.spec == P() for s in jax.tree.leaves(shardings))
    # ... and the lint says so, naming the rule and the close match.
    issues = [i for i in lint(LM.abstract_params(), LM.logical_axes, mesh=mesh, strategy=typo)
              if i.kind == "unknown_logical_axis"]
    assert [i.where for i in issues] == ["strategy typo rule 'embd'"]
    assert "did you mean 'embed'?" in issues[0].message
    # Built-in rules for standard names are model-generic: no such finding.
    for name in sh.strategy_names():
        assert not [i for i in lint(LM.abstract_params(), LM.logical_axes, mesh=mesh, strategy=name)
                    if i.kind == "unknown_logical_axis"]


def test_empty_devices_and_bad_micro_batches_are_named():
    with pytest.raises(sh.ShardingError, match="make_mesh: devices is empty"):
        sh.make_mesh({"data": -1}, devices=[])
    mesh = sh.make_mesh()
    for bad in (0, -1, 2.0):
        with pytest.raises(sh.ShardingError, match=r"micro_batches must be an int >= 1"):
            sh.check_batch({"tokens": np.zeros((8, 4))}, mesh=mesh, strategy="fsdp", micro_batches=bad)
    assert sh.check_batch({"tokens": np.zeros((16, 4))}, mesh=mesh, strategy="fsdp", micro_batches=np.int64(2)) == 16
