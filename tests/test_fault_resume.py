"""Issue 22's fault test: an SFT run and a GRPO run, each SIGKILLed at three points of its checkpointing
(between checkpoints, during an async save, right after one), then a byte of the newest step flipped:
the rerun falls back to the newest intact step and ends with the parameters, bit for bit, of a run
that was never interrupted.

Every run is the real CLI in a subprocess (`killed_runs.run_cli`); 8 steps, a checkpoint every 2,
saves asynchronous (the default); the SFT run evaluates every 4 steps and writes its results. The
lives of the interrupted run:
1. killed when step 3 is dispatched, step 2 committed and no save in flight -> on disk: 2;
2. resumed from 2, killed while the async save of step 4 sits in orbax's temporary directory
   -> on disk: 2 and the uncommitted `4.orbax-checkpoint-tmp`;
3. resumed from 2 (the partial step 4 is discarded), killed right after step 6 is committed -> 2, 4, 6;
4. one byte of step 6's weights flipped; resumed from step 4 (the newest intact one, with the
   warning), trained to step 8: parameters and metrics equal the uninterrupted run's.
"""

import os

import chex
import jax
import numpy as np
import pytest
from killed_runs import cli_env, flip_byte, run_cli  # noqa: F401 (cli_env is a fixture)

from rlhf_jax.checkpoint import Checkpointer, load_params
from rlhf_jax.checkpoint_manifest import MANIFEST_NAME
from rlhf_jax.metrics import read_jsonl

_SFT_SETS = {"data.num_train": 256, "data.num_eval": 32, "data.batch_size": 8, "train.steps": 8,
             "train.eval_every": 4, "train.eval_batches": 1, "checkpoint.every": 2, "checkpoint.keep": 5,
             "logging.tensorboard": "false", "logging.console": "false"}
RUNS = {
    "sft": ["run", "experiments/sft_tiny.py", *[a for k, v in _SFT_SETS.items() for a in ("--set", f"{k}={v}")]],
    "grpo": ["run", "tests/grpo_fault_experiment.py"],  # 8 steps, a checkpoint every 2, async
}
_TMP = ".orbax-checkpoint-tmp"


def _params(run_dir, step):
    root = run_dir / "checkpoints"
    with Checkpointer(root, read_only=True) as ckpt:
        abstract = {k: jax.ShapeDtypeStruct(*v) for k, v in ckpt.item_shapes("params", step).items()}
    return load_params(root, abstract, step=step)


def _last_per_step(run_dir, steps):
    """The last metrics line of each kind (training, evaluation) for each of `steps` (a resumed run logs its
    retrained steps again), timings left out."""
    out = {}
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        if record["step"] in steps:
            kind = "eval" if any(k.startswith("eval/") for k in record) else "train"
            out[record["step"], kind] = {k: v for k, v in record.items() if not k.startswith("time/")
                                         and k != "tokens_per_second"}
    return out


@pytest.mark.parametrize("family", sorted(RUNS))
def test_killed_at_three_points_then_corrupted_resumes_bit_identical(family, tmp_path, cli_env):  # noqa: F811
    straight, faulty = tmp_path / "straight", tmp_path / "faulty"
    ckpts = faulty / "checkpoints"

    def args(workdir):
        return [*RUNS[family], "--set", f"workdir={workdir}"]

    done = run_cli(args(straight), env=cli_env)
    assert done.returncode == 0, done.stderr[-3000:]

    # 1. Between checkpoints: step 3 dispatched, step 2 committed, nothing in flight.
    life = run_cli(args(faulty), env=cli_env, kill="between:3")
    assert life.returncode == -9, life.stderr[-3000:]
    assert os.listdir(ckpts) == ["2"]

    # 2. During the async save of step 4: its files are in orbax's temporary directory, uncommitted.
    life = run_cli(args(faulty), env=cli_env, kill="saving:4")
    assert life.returncode == -9, life.stderr[-3000:]
    assert f"resuming from step 2 ({ckpts})" in life.stderr
    assert sorted(os.listdir(ckpts)) == ["2", f"4{_TMP}"]
    partial = [f for _, _, fs in os.walk(ckpts / f"4{_TMP}" / "params") for f in fs]
    assert partial and not (ckpts / f"4{_TMP}" / MANIFEST_NAME).exists()

    # 3. Right after a checkpoint: step 6 committed with its manifest (the partial step 4 was discarded
    # on resuming from 2, and step 4 saved again).
    life = run_cli(args(faulty), env=cli_env, kill="saved:6")
    assert life.returncode == -9, life.stderr[-3000:]
    assert f"resuming from step 2 ({ckpts})" in life.stderr
    assert sorted(os.listdir(ckpts)) == ["2", "4", "6"]
    with Checkpointer(ckpts, read_only=True) as ckpt:
        assert [ckpt.verify(s).status for s in (2, 4, 6)] == ["intact"] * 3

    # 4. A flipped byte in step 6: the rerun falls back to step 4 and finishes.
    bad = flip_byte(ckpts / "6")
    last = run_cli(args(faulty), env=cli_env)
    assert last.returncode == 0, last.stderr[-3000:]
    assert (f"checkpoint {ckpts / '6'} is corrupt: {bad.relative_to(ckpts / '6')}: checksum differs from the "
            f"manifest (the file's bytes changed); moved it to {ckpts / '6'}.corrupt; using step 4, the newest "
            "intact checkpoint") in last.stderr
    assert f"resuming from step 4 ({ckpts})" in last.stderr
    assert sorted(os.listdir(ckpts)) == ["2", "4", "6", "6.corrupt", "8"]

    final = _params(faulty, 8)
    chex.assert_trees_all_equal(final, _params(straight, 8), strict=True)  # tree, shapes, dtypes and bits
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(_params(faulty, 4))))
    resumed = _last_per_step(faulty, range(5, 9))
    assert resumed == _last_per_step(straight, range(5, 9))
    if family == "sft":  # evaluated at step 8 and reported, like the uninterrupted run
        assert (8, "eval") in resumed and (faulty / "results.json").exists()
