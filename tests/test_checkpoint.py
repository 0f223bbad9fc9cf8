"""Checkpointer: whole-state round trip, retention, shape/model checks before restore, crash safety."""

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointMismatchError,
    flatten_tree,
    is_checkpoint_dir,
    load_params,
    read_model_config,
    unflatten_tree,
)
from rlhf_jax.config import CheckpointConfig, to_dict
from rlhf_jax.testing import tiny_config


class State(NamedTuple):
    step: jax.Array
    opt_state: optax.OptState
    rng: jax.Array


def _params(scale=1.0):
    w = jnp.arange(12, dtype=jnp.float32).reshape(3, 4) * scale
    return {"w": w, "b": {"x": jnp.full((4,), scale, jnp.float32)}}


def _state(params, step=5):
    opt = optax.adamw(1e-2)
    opt_state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = opt.update(grads, opt_state, params)
    return State(jnp.int32(step), opt_state, jax.random.key(step))


def _equal_trees(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_flatten_unflatten_names_paths():
    tree = {"a": {"b": 1, "c": (2, 3)}, "d": State(4, (), 5)}
    flat = flatten_tree(tree)
    assert flat == {"a.b": 1, "a.c.0": 2, "a.c.1": 3, "d.step": 4, "d.rng": 5}
    assert unflatten_tree(tree, {k: v * 10 for k, v in flat.items()}) == {
        "a": {"b": 10, "c": (20, 30)}, "d": State(40, (), 50)}


def test_round_trip_whole_state_with_key_and_extras(tmp_path):
    params = _params()
    state = _state(params)
    extras = {"data": {"position": np.int64(7), "epoch": 1, "seed": 3}, "kl": {"coef": np.float32(0.5)}}
    with Checkpointer(tmp_path, model_config=tiny_config()) as ckpt:
        assert ckpt.save(5, {"params": params, "train": state}, extras=extras)
        assert not ckpt.save(5, {"params": params, "train": state})  # existing step: skipped
    assert is_checkpoint_dir(tmp_path) and not is_checkpoint_dir(tmp_path / "5")
    with Checkpointer(tmp_path, model_config=tiny_config()) as ckpt:
        assert ckpt.latest_step() == 5
        target = jax.eval_shape(lambda: {"params": params, "train": state})
        restored, got_extras = ckpt.restore(target)
    _equal_trees(restored["params"], params)
    _equal_trees(restored["train"], state)
    assert isinstance(restored["train"], State)
    assert jax.dtypes.issubdtype(restored["train"].rng.dtype, jax.dtypes.prng_key)
    assert got_extras == {"data": {"position": 7, "epoch": 1, "seed": 3}, "kl": {"coef": 0.5}}
    # Params alone (as checkpoint.init_from does), and the saved model config.
    only = load_params(tmp_path, jax.eval_shape(lambda: params), model_config=tiny_config())
    _equal_trees(only, params)
    assert read_model_config(tmp_path) == to_dict(tiny_config())


def test_restore_onto_a_sharding(tmp_path):
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    params = {"w": jnp.arange(32.0).reshape(8, 4)}
    with Checkpointer(tmp_path, config=CheckpointConfig(async_save=False)) as ckpt:
        ckpt.save(1, {"params": params})
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
        target = {"params": {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sharding)}}
        restored, _ = ckpt.restore(target)
    assert restored["params"]["w"].sharding == sharding
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(32.0).reshape(8, 4))


def test_keeps_latest_n_and_best_by_metric(tmp_path):
    cfg = CheckpointConfig(keep=2, keep_best=1, best_metric="eval/acc", best_mode="max", async_save=False)
    accs = {2: 0.9, 4: 0.2, 6: 0.3}
    with Checkpointer(tmp_path, config=cfg) as ckpt:
        for step in range(1, 8):
            metrics = {"eval/acc": accs[step]} if step in accs else None
            ckpt.save(step, {"params": _params(step)}, metrics=metrics)
        assert ckpt.all_steps() == [2, 6, 7]
        assert ckpt.best_step() == 2
        assert ckpt.metrics(2) == {"eval/acc": 0.9} and ckpt.metrics(7) is None
        restored, _ = ckpt.restore({"params": jax.eval_shape(_params)}, step=2)
    _equal_trees(restored["params"], _params(2))
    cfg_min = CheckpointConfig(keep=1, keep_best=1, best_metric="eval/loss", best_mode="min", async_save=False)
    with Checkpointer(tmp_path / "min", config=cfg_min) as ckpt:
        for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 5.0)]:
            ckpt.save(step, {"params": _params(step)}, metrics={"eval/loss": loss})
        assert ckpt.all_steps() == [2, 4]



@pytest.mark.parametrize("mode,tied,other", [("min", 0.1, 0.5), ("max", 0.9, 0.2)])
def test_a_tie_for_best_is_the_latest_tied_step_before_and_after_retention(tmp_path, mode, tied, other):
    """`best_step` among tied steps named the earliest under "min" (the latest under "max") while
    retention keeps the latest: "best" moved from step 1 to step 2 once step 1 left the window."""
    seq = [(1, tied), (2, tied), (3, other), (4, other)]
    for keep, kept in [(5, [1, 2, 3, 4]), (2, [2, 3, 4])]:
        cfg = CheckpointConfig(keep=keep, keep_best=1, best_metric="eval/x", best_mode=mode, async_save=False)
        with Checkpointer(tmp_path / f"{mode}{keep}", config=cfg) as ckpt:
            for step, value in seq:
                ckpt.save(step, {"params": _params(step)}, metrics={"eval/x": value})
            assert ckpt.all_steps() == kept
            assert ckpt.best_step() == 2

def test_mismatched_model_is_reported_before_reading_arrays(tmp_path):
    params = _params()
    with Checkpointer(tmp_path, model_config=tiny_config()) as ckpt:
        ckpt.save(3, {"params": params, "train": _state(params)})
    other = {"w": jnp.zeros((3, 5)), "b": {"x": jnp.zeros((4,), jnp.bfloat16)}, "extra": jnp.zeros(2)}
    with Checkpointer(tmp_path, model_config=tiny_config(hidden_size=32, num_layers=3)) as ckpt:
        with pytest.raises(CheckpointMismatchError) as e:
            ckpt.restore({"params": jax.eval_shape(lambda: other)})
    msg = str(e.value)
    assert f"checkpoint {tmp_path}/3 does not match" in msg
    assert "model.hidden_size: checkpoint 64, this run 32" in msg
    assert "model.num_layers: checkpoint 2, this run 3" in msg
    assert "params.w: checkpoint (3, 4) float32, this run (3, 5) float32" in msg
    assert "params.b.x: checkpoint (4,) float32, this run (4,) bfloat16" in msg
    assert "params.extra: missing from the checkpoint" in msg
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointMismatchError, match="item 'value': missing from the checkpoint"):
            ckpt.restore({"value": jax.eval_shape(_params)})
        with pytest.raises(FileNotFoundError, match="available steps: \\[3\\]"):
            ckpt.restore({"params": jax.eval_shape(_params)}, step=9)


_CRASH = textwrap.dedent("""
    import os, signal, sys, time
    import jax.numpy as jnp
    from rlhf_jax.checkpoint import Checkpointer
    from rlhf_jax.config import CheckpointConfig
    root = sys.argv[1]
    ckpt = Checkpointer(root, config=CheckpointConfig(async_save=True))
    ckpt.save(1, {"params": {"w": jnp.ones((4, 4))}}, extras={"position": 1})
    ckpt.wait()
    big = {"w": jnp.ones((4, 4)) * 2, "big": jnp.ones((4096, 4096))}
    ckpt.save(2, {"params": big}, extras={"position": 2})
    # The async save creates step 2's temporary directory in the background: kill once it is there.
    for _ in range(2000):
        if any("tmp" in name for name in os.listdir(root)):
            break
        time.sleep(0.002)
    print("DIR", sorted(os.listdir(root)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_crash_during_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    listing = [line for line in proc.stdout.splitlines() if line.startswith("DIR")][0]
    assert "'1'" in listing and "'2'" not in listing and "tmp" in listing  # step 2 was mid-write
    with Checkpointer(tmp_path, read_only=True) as ckpt:  # e.g. init_from another run: touches nothing
        assert ckpt.all_steps() == [1]
        with pytest.raises(RuntimeError, match="read-only"):
            ckpt.save(3, {"params": {"w": jnp.ones((4, 4))}})
    assert len(os.listdir(tmp_path)) == 2
    # Orbax removes partial writes in a background thread; slow it down so that a checkpointer which
    # did not wait for it would be closed with the partial write still on disk.
    from orbax.checkpoint._src.path import async_path

    rmtree = async_path.rmtree

    async def slow_rmtree(*args, **kwargs):
        await asyncio.sleep(1.0)
        return await rmtree(*args, **kwargs)

    monkeypatch.setattr(async_path, "rmtree", slow_rmtree)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1]
        restored, extras = ckpt.restore({"params": {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)}})
    np.testing.assert_array_equal(restored["params"]["w"], np.ones((4, 4)))
    assert extras == {"position": 1}
    assert sorted(os.listdir(tmp_path)) == ["1"]  # the partial write was cleaned up


# ------------------------------------------------------------------------------ integrity (issue 22)


def _weights(step):
    return {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) * step, "b": jnp.full((8,), step, jnp.float32)}


def _three_steps(root, **config):
    with Checkpointer(root, config=CheckpointConfig(keep=3, **config)) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"params": _weights(step)}, extras={"position": step})


def _largest_weight_file(step_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "params")) for f in fs]
    return max(files, key=os.path.getsize)


def _restore(ckpt, step=None):
    return ckpt.restore({"params": jax.eval_shape(lambda: _weights(1))}, step=step)


@pytest.mark.parametrize("async_save", [True, False])
def test_every_step_has_a_manifest_of_its_files(tmp_path, async_save):
    from rlhf_jax.checkpoint_manifest import MANIFEST_NAME, build_manifest

    _three_steps(tmp_path, async_save=async_save)
    for step in (1, 2, 3):
        step_dir = tmp_path / str(step)
        with open(step_dir / MANIFEST_NAME) as f:
            manifest = json.load(f)
        assert manifest == build_manifest(step_dir)  # written after the last file, nothing changed since
        names = set(manifest["files"])
        assert {"meta/metadata", "extras/metadata", "params/_METADATA"} <= names
        assert not any("/" not in n for n in names)  # orbax's own top-level files are not listed
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 3 and [ckpt.verify(s).status for s in (1, 2, 3)] == ["intact"] * 3


def test_a_truncated_file_in_the_latest_step_falls_back_to_the_previous_one(tmp_path, caplog):
    _three_steps(tmp_path)
    bad = _largest_weight_file(tmp_path / "3")
    size = os.path.getsize(bad)
    with open(bad, "r+b") as f:
        f.truncate(size // 2)
    rel = os.path.relpath(bad, tmp_path / "3")
    with caplog.at_level("WARNING", logger="rlhf_jax.checkpoint"):
        with Checkpointer(tmp_path, config=CheckpointConfig(keep=3)) as ckpt:
            assert ckpt.latest_step() == 2
            restored, extras = _restore(ckpt)
            assert ckpt.all_steps() == [1, 2]
            assert ckpt.save(3, {"params": _weights(30)})  # the step is saved again, not refused
    _equal_trees(restored["params"], _weights(2))
    assert extras == {"position": 2}
    warnings = [r.getMessage() for r in caplog.records if r.name == "rlhf_jax.checkpoint"]
    assert warnings == [
        f"checkpoint {tmp_path}/3 is corrupt: {rel}: {size // 2} bytes, the manifest says {size}; moved it to "
        f"{tmp_path}/3.corrupt; using step 2, the newest intact checkpoint"
    ]
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3", "3.corrupt"]  # kept for inspection
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 3
        _equal_trees(_restore(ckpt)[0]["params"], _weights(30))


def test_exporting_a_corrupt_step_by_number_names_the_file_and_writes_nothing(tmp_path, caplog):
    """`export_hf(step=N)` of a corrupt step (and `item_shapes` of it) raises CheckpointCorruptError
    naming the step and the file before orbax reads its metadata; "latest" exports the intact step."""
    from rlhf_jax.checkpoint_hf import export_hf
    from rlhf_jax.models import CausalLM

    config = tiny_config()
    root = tmp_path / "ck"
    with Checkpointer(root, config=CheckpointConfig(async_save=False), model_config=config) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"params": CausalLM(config).init(jax.random.key(step))})
    bad = _largest_weight_file(root / "2")
    size = os.path.getsize(bad)
    with open(bad, "r+b") as f:
        f.truncate(10)
    problem = f"{root}/2 is corrupt: {os.path.relpath(bad, root / '2')}: 10 bytes, the manifest says {size}"
    with pytest.raises(CheckpointCorruptError) as err:
        export_hf(root, tmp_path / "out", step=2)
    assert problem in str(err.value)
    with Checkpointer(root, read_only=True) as ckpt, pytest.raises(CheckpointCorruptError) as err:
        ckpt.item_shapes("params", 2)
    assert problem in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["ck"] and sorted(os.listdir(root)) == ["1", "2"]  # read-only: untouched
    with caplog.at_level("WARNING", logger="rlhf_jax.checkpoint"):
        assert export_hf(root, tmp_path / "out").step == 1
    assert any(problem in r.getMessage() for r in caplog.records)


def test_a_flipped_byte_in_a_weight_file_is_detected(tmp_path, caplog):
    _three_steps(tmp_path)
    bad = _largest_weight_file(tmp_path / "3")
    with open(bad, "r+b") as f:
        f.seek(os.path.getsize(bad) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    rel = os.path.relpath(bad, tmp_path / "3")
    problem = f"{rel}: checksum differs from the manifest (the file's bytes changed)"
    with Checkpointer(tmp_path, read_only=True) as ckpt:  # e.g. export or init_from: nothing is moved
        assert ckpt.verify(3) == ("corrupt", problem)
        with pytest.raises(CheckpointCorruptError) as info:
            _restore(ckpt, step=3)  # the step asked for by number: no silent fallback
        assert str(info.value) == f"checkpoint {tmp_path}/3 is corrupt: {problem}"
        with caplog.at_level("WARNING", logger="rlhf_jax.checkpoint"):
            assert ckpt.latest_step() == 2
        _equal_trees(_restore(ckpt)[0]["params"], _weights(2))
    assert f"checkpoint {tmp_path}/3 is corrupt: {problem}; using step 2" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]
    only = load_params(tmp_path, jax.eval_shape(lambda: _weights(1)))  # the drivers' init_from path
    _equal_trees(only, _weights(2))


def test_on_corrupt_raise_is_one_line_naming_the_step_and_the_file(tmp_path):
    _three_steps(tmp_path)
    missing = _largest_weight_file(tmp_path / "3")
    size = os.path.getsize(missing)
    os.remove(missing)  # a partial step
    rel = os.path.relpath(missing, tmp_path / "3")
    with Checkpointer(tmp_path, config=CheckpointConfig(on_corrupt="raise")) as ckpt:
        with pytest.raises(CheckpointCorruptError) as info:
            ckpt.latest_step()
        with pytest.raises(CheckpointCorruptError):
            _restore(ckpt)
    assert str(info.value) == (
        f"checkpoint {tmp_path}/3 is corrupt: {rel}: missing ({size} bytes in the manifest) "
        "(checkpoint.on_corrupt=raise; 'fallback' resumes from the newest intact step)"
    )
    assert "\n" not in str(info.value) and isinstance(info.value, CheckpointMismatchError)  # the CLI's one line
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]
    with pytest.raises(ValueError, match="checkpoint.on_corrupt must be one of"):
        CheckpointConfig(on_corrupt="ignore")


def test_a_lost_manifest_is_corrupt_and_no_intact_step_raises(tmp_path):
    from rlhf_jax.checkpoint_manifest import MANIFEST_NAME

    _three_steps(tmp_path)
    os.remove(tmp_path / "3" / MANIFEST_NAME)
    for step in (1, 2):
        with open(tmp_path / str(step) / "meta" / "metadata", "a") as f:
            f.write(" ")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.verify(3) == ("corrupt", f"{MANIFEST_NAME}: missing (the step was saved with one)")
        with pytest.raises(CheckpointCorruptError, match=f"checkpoint {tmp_path}/3 is corrupt: {MANIFEST_NAME}: "
                                                         "missing .*; no older checkpoint there is intact"):
            ckpt.latest_step()
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]  # nothing is moved when nothing is intact


def test_a_step_without_manifest_loads_unverified_and_a_bad_one_is_one_line(tmp_path):
    """Checkpoints written before manifests existed: no manifest and no 'manifest' key in their meta."""
    from rlhf_jax.checkpoint_manifest import MANIFEST_NAME

    _three_steps(tmp_path)
    for step in (2, 3):
        os.remove(tmp_path / str(step) / MANIFEST_NAME)
        meta_file = tmp_path / str(step) / "meta" / "metadata"
        meta = json.loads(meta_file.read_text())
        del meta["manifest"]
        meta_file.write_text(json.dumps(meta))
    with open(_largest_weight_file(tmp_path / "3"), "r+b") as f:
        f.truncate(10)
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.verify(2) == ("unverified", None) and ckpt.latest_step() == 3
        _equal_trees(_restore(ckpt, step=2)[0]["params"], _weights(2))
        with pytest.raises(CheckpointCorruptError) as info:
            _restore(ckpt, step=3)
    message = str(info.value)
    assert message.startswith(f"checkpoint {tmp_path}/3 could not be read (")
    assert message.endswith("); it has no integrity manifest to name the bad file") and "\n" not in message


_KILL_AFTER_COMMIT = textwrap.dedent("""
    import os, signal, sys, time
    import jax.numpy as jnp
    from rlhf_jax.checkpoint import Checkpointer
    from rlhf_jax.config import CheckpointConfig
    root = sys.argv[1]
    ckpt = Checkpointer(root, config=CheckpointConfig(async_save=True))
    ckpt.save(1, {"params": {"w": jnp.ones((512, 512))}}, extras={"position": 1})
    while not os.path.isdir(os.path.join(root, "1")):  # committed by orbax's background thread
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)  # before wait() or close()
""")


def test_an_async_step_is_committed_with_its_manifest(tmp_path):
    from rlhf_jax.checkpoint_manifest import MANIFEST_NAME

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_COMMIT, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert os.path.isfile(tmp_path / "1" / MANIFEST_NAME)
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.verify(1) == ("intact", None)
        restored, extras = ckpt.restore({"params": {"w": jax.ShapeDtypeStruct((512, 512), jnp.float32)}})
    np.testing.assert_array_equal(restored["params"]["w"], np.ones((512, 512)))
    assert extras == {"position": 1}


# ------------------------------------------------------------------- across layouts and exports (s23)


def test_a_state_saved_fsdp_on_8_restores_bitwise_onto_tp_dp_and_one_device(tmp_path):
    """A bf16 TrainState (Adam moments, key) saved sharded fsdp over 8 devices comes back bit for bit
    on a tp mesh of 2, dp of 4 and one device, each leaf in the new layout's sharding."""
    from rlhf_jax import sharding as sh
    from rlhf_jax.models import CausalLM
    from rlhf_jax.optim import OptimizerConfig, make_optimizer
    from rlhf_jax.state import abstract_train_state, create_train_state, train_state_shardings

    cfg = tiny_config(param_dtype="bfloat16")
    lm, tx = CausalLM(cfg), make_optimizer(OptimizerConfig(learning_rate=1e-3))
    state = create_train_state(lm.init, tx, rng=0, logical_axes=lm.logical_axes,
                               mesh=sh.make_mesh({"fsdp": 8}), strategy="fsdp")
    state = state._replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))  # non-trivial moments
    with Checkpointer(tmp_path, model_config=cfg, config=CheckpointConfig(async_save=False)) as ckpt:
        ckpt.save(1, {"train": state}, extras={"data": {"position": 3}})
    host, abstract = jax.tree.map(np.asarray, state), abstract_train_state(lm.init, tx)
    for shape, strategy in [({"tensor": 2}, "tp"), ({"data": 4}, "dp"), ({"data": 1}, "fsdp")]:
        mesh = sh.make_mesh(shape, devices=jax.devices()[:max(shape.values())])
        shardings = train_state_shardings(abstract, lm.logical_axes, tx, mesh=mesh, strategy=strategy)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        with Checkpointer(tmp_path, model_config=cfg) as ckpt:
            restored, extras = ckpt.restore({"train": target})
        assert extras == {"data": {"position": 3}}
        for got, want, sharding in zip(jax.tree.leaves(restored["train"]), jax.tree.leaves(host),
                                       jax.tree.leaves(shardings)):
            assert got.sharding == sharding and got.dtype == want.dtype
            np.testing.assert_array_equal(np.asarray(got), want)


def test_a_sharded_lora_reward_model_exports_merged_as_a_sequence_classifier(tmp_path):
    """A LoRA reward model's checkpoint saved fsdp over 8 devices exports (merge=True) as
    `LlamaForSequenceClassification`; transformers' scores equal ours within 1e-5."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from rlhf_jax import sharding as sh
    from rlhf_jax.checkpoint_hf import export_hf
    from rlhf_jax.models import CausalLM
    from rlhf_jax.models.lora import LoraConfig, LoraLM
    from rlhf_jax.state import place_params
    from rlhf_jax.train.adapters import params_items

    cfg = tiny_config()
    model = LoraLM(CausalLM(cfg, head="scalar"), LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down")))
    params = model.init(jax.random.key(2))
    params["lora"] = jax.tree.map(lambda x: 0.1 * jax.random.normal(jax.random.key(5), x.shape, x.dtype),
                                  params["lora"])  # B != 0: the merge matters
    params = place_params(params, model.logical_axes, mesh=sh.make_mesh({"fsdp": 8}), strategy="fsdp")
    with Checkpointer(tmp_path / "ckpt", model_config=cfg, config=CheckpointConfig(async_save=False)) as ckpt:
        ckpt.save(3, params_items(model, params))
    assert export_hf(tmp_path / "ckpt", tmp_path / "hf", merge=True).step == 3
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        theirs = hf.score(hf.model(torch.tensor(tokens)).last_hidden_state)[..., 0].numpy()
    np.testing.assert_allclose(theirs, np.asarray(model.forward(params, jnp.asarray(tokens)).values), atol=1e-5)
    with pytest.raises(ValueError, match="step must be a step number, 'latest' or 'best', got 'bset'"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf2", step="bset")
