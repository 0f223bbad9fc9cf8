"""Checkpointer: whole-state round trip, retention, shape/model checks before restore, crash safety."""

import asyncio
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
    import os, signal, sys
    import jax.numpy as jnp
    from rlhf_jax.checkpoint import Checkpointer
    from rlhf_jax.config import CheckpointConfig
    root = sys.argv[1]
    ckpt = Checkpointer(root, config=CheckpointConfig(async_save=True))
    ckpt.save(1, {"params": {"w": jnp.ones((4, 4))}}, extras={"position": 1})
    ckpt.wait()
    big = {"w": jnp.ones((4, 4)) * 2, "big": jnp.ones((4096, 4096))}
    ckpt.save(2, {"params": big}, extras={"position": 2})
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
