"""Ahead-of-time compilation: memory report, FSDP really shards W1, too-large reported, bad input, TPU."""

import importlib.util
import json

import jax
import pytest

from rlhf_jax import compile as aot
from rlhf_jax import sharding as sh
from rlhf_jax.models.presets import get_config
from rlhf_jax.targets import tpu_topology_devices
from rlhf_jax.testing import tiny_config
from rlhf_jax.training_program import step_flops

FAST = {"xla_backend_optimization_level": 0}


def _mesh(shape):
    n = 1
    for v in shape.values():
        n *= v
    return sh.make_mesh(shape, devices=jax.devices()[:n])


@pytest.fixture(scope="module")
def w1_reports():
    """W1's SFT step on 1 device and FSDP over 8 (sequence length cut to 32: state size is what counts)."""
    out = {}
    for n in (1, 8):
        out[n] = aot.compile_training_step(get_config("w1"), step="sft", mesh=_mesh({"fsdp": n}), strategy="fsdp",
                                           batch_size=8, seq_len=32, device_memory_bytes=64 * 2**20,
                                           compiler_options=FAST)
    return out


def test_fsdp_shards_w1_state_and_arguments(w1_reports):
    one, eight = w1_reports[1], w1_reports[8]
    assert one.ok and eight.ok
    # 7,358,720 f32 parameters + Adam's mu and nu = 88.3 MB on one device.
    assert one.state_bytes == pytest.approx(7_358_720 * 4 * 3, rel=1e-3)
    assert eight.state_bytes <= 0.2 * one.state_bytes
    # XLA's own figure for the parameters + optimizer state it receives (plus the small batch).
    assert eight.argument_bytes <= 0.2 * one.argument_bytes
    assert one.argument_bytes >= one.state_bytes
    assert one.peak_bytes >= one.argument_bytes
    assert one.flops and one.flops > 0
    assert one.model_flops == pytest.approx(step_flops(get_config("w1"), step="sft", batch_size=8, seq_len=32))


def test_too_large_is_reported_with_figures(w1_reports):
    report = w1_reports[1]
    assert not report.fits
    assert "GiB" in report.reason and "> 0.062 GiB per device" in report.reason
    text = aot.format_report(report)
    assert "fits: NO" in text and "train state per device: 0.082 GiB" in text


def test_bad_input_fails_before_compiling():
    with pytest.raises(sh.ShardingError, match="has 3 devices but 8 are available"):
        sh.make_mesh({"data": 3})
    expert = sh.Strategy(name="expert_parallel", rules={"mlp": "expert"})
    with pytest.raises(sh.ShardingError, match=r"names mesh axes \['expert'\] that the mesh lacks"):
        aot.compile_training_step(tiny_config(), step="sft", mesh=_mesh({"data": 8}), strategy=expert,
                                  batch_size=8, seq_len=16)
    with pytest.raises(sh.ShardingError, match="batch size 6 .* not divisible by 8"):
        aot.compile_training_step(tiny_config(), step="sft", mesh=_mesh({"fsdp": 8}), strategy="fsdp",
                                  batch_size=6, seq_len=16)
    with pytest.raises(sh.ShardingError, match="kv_heads, size 2"):
        aot.compile_training_step(tiny_config(), step="dpo", mesh=_mesh({"data": 2, "tensor": 4}), strategy="tp",
                                  batch_size=8, seq_len=16)


def test_sharding_report_counts_what_compile_counts():
    """`sharding_report.compile_strategy` (bench_sharding, notebook 03) builds the program
    `compile_training_step` plans, and counts its collectives the same way: a collective in the
    scanned layer loop once per layer, so data parallelism's all-reduce is every parameter's
    gradient (4 bytes each) plus the step's few metric scalars."""
    import math

    from rlhf_jax.models import CausalLM
    from rlhf_jax.sharding_report import compile_strategy

    for step, head in (("sft", "lm"), ("reward_model", "scalar")):
        n = sum(math.prod(x.shape) for x in jax.tree.leaves(CausalLM(tiny_config(), head=head).abstract_params()))
        row = compile_strategy(tiny_config(), step=step, strategy="dp", mesh_shape=None, batch_size=8, seq_len=16).row
        assert set(row["collective_bytes"]) == {"all-reduce", "total"}
        assert 4 * n <= row["collective_bytes"]["all-reduce"] < 4 * n + 64, (step, n, row["collective_bytes"])
    shape = {"fsdp": 4, "tensor": 2}
    report = aot.compile_training_step(tiny_config(), step="dpo", mesh=_mesh(shape), strategy="fsdp_tp",
                                       batch_size=8, seq_len=16)
    row = compile_strategy(tiny_config(), step="dpo", strategy="fsdp_tp", mesh_shape=shape, batch_size=8,
                           seq_len=16).row
    assert row["peak_mib"] * 2**20 == report.peak_bytes and row["argument_mib"] * 2**20 == report.argument_bytes
    assert row["collective_bytes"] == report.collectives and report.collectives["all-gather"] > 0
    assert row["model_flops"] == report.model_flops
    with pytest.raises(ValueError, match="compile_strategy: step must be one of"):
        compile_strategy(tiny_config(), step="ppo", strategy="dp", mesh_shape=None, batch_size=8, seq_len=16)


def test_cli_main_writes_json_report(tmp_path, capsys):
    path = tmp_path / "report.json"
    code = aot.main(["--model", "tiny", "--step", "reward_model", "--strategy", "fsdp_tp",
                     "--mesh", "fsdp=4,tensor=2", "--batch", "8", "--seq", "16", "--json", str(path),
                     "--compiler-option", "xla_backend_optimization_level=0"])
    assert code == 0
    report = json.loads(path.read_text())
    assert report["ok"] and report["fits"] and report["num_devices"] == 8
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert "fits: yes" in capsys.readouterr().out
    assert aot.main(["--model", "tiny", "--mesh", "data=3"]) == 2
    assert "has 3 devices" in capsys.readouterr().err
    # A bad --set is bad input (exit 2, one line naming it), not a traceback or SystemExit(1).
    assert aot.main(["--model", "tiny", "--set", "num_layer=2"]) == 2
    assert "--set 'num_layer=2'" in capsys.readouterr().err
    assert aot.main(["--model", "tiny", "--set", "num_layers=abc"]) == 2
    err = capsys.readouterr().err
    assert "ModelConfig.num_layers must be a positive int, got 'abc'" in err and "Traceback" not in err
    # Sizes are checked where they are parsed (--batch -8 was a traceback, --cpu-devices -2 ignored).
    for flag, value in [("--batch", "-8"), ("--seq", "x"), ("--micro-batches", "0"), ("--cpu-devices", "-2")]:
        with pytest.raises(SystemExit) as e:
            aot.main(["--model", "tiny", flag, value])
        assert e.value.code == 2
        assert f"argument {flag}: must be an int >= 1, got '{value}'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (the [tpu] extra)")
def test_tpu_slices_smaller_than_a_host_are_described():
    """libtpu's default 2x2x1 chips per host refused 'v5e:1x1' (a v5litepod-1) and 'v6e:2x1' as not
    divisible by it, so such a slice could not be planned."""
    assert [(len(d), d[0].device_kind) for d in map(tpu_topology_devices, ("v5e:1x1", "v6e:2x1", "v5e:2x2"))] == [
        (1, "TPU v5 lite"), (2, "TPU v6 lite"), (4, "TPU v5 lite")]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (the [tpu] extra)")
def test_tpu_topology_compile():
    devices = tpu_topology_devices("v5e:2x4")
    assert len(devices) == 8 and devices[0].platform == "tpu"
    mesh = sh.make_mesh({"fsdp": 4, "tensor": 2}, devices=devices)
    report = aot.compile_training_step(tiny_config(), step="dpo", mesh=mesh, strategy="fsdp_tp", batch_size=8,
                                       seq_len=64, target="v5e:2x4")
    assert report.ok and report.fits
    assert report.device_memory_bytes == 16 * 2**30
    assert report.target == "v5e:2x4" and report.num_devices == 8
