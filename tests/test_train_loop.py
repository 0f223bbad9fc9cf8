"""The shared training loop on a toy problem: logging, eval, checkpoints, signals, NaN/Inf policy."""

import io
import math
import json
import os
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import CheckpointConfig, ConfigError, LoggingConfig, TrainConfig
from rlhf_jax.metrics import read_jsonl
from rlhf_jax.train.loop import Interrupted, StopSignal, TrainingHalted, fit, interrupt_outside_training, open_run
from rlhf_jax.train.results import json_ready

QUIET = LoggingConfig(console=False, tensorboard=False)
CKPT = CheckpointConfig(every=2, keep=10, async_save=False)


class Counter:
    """A resumable batch iterator: batch k is {"x": [k, k]}."""

    def __init__(self):
        self.position = 0

    def __next__(self):
        self.position += 1
        return {"x": np.full((2,), self.position, np.float32)}

    def get_state(self):
        return {"position": self.position}


@jax.jit
def _toy_step(state, batch):
    w = state["w"] - 0.1 * (state["w"] - batch["x"].mean())
    loss = jnp.mean((state["w"] - batch["x"]) ** 2)
    return {"w": w, "step": state["step"] + 1}, {"loss": loss, "nonfinite": jnp.float32(0)}


def _fit(run, *, steps, start=0, state=None, step_fn=_toy_step, evaluate=None, batches=None, train=None,
         checkpoint=CKPT, logging=QUIET):
    batches = batches or Counter()
    state = state or {"w": jnp.zeros(()), "step": jnp.int32(0)}
    return fit(state=state, step_fn=step_fn, batches=batches, start_step=start,
               train=train or TrainConfig(steps=steps, eval_every=2), checkpoint=checkpoint, logging=logging,
               run=run, save_items=lambda s: {"params": s}, extras=lambda: {"data": batches.get_state()},
               evaluate=evaluate)


def test_fit_logs_every_step_evaluates_and_checkpoints(tmp_path):
    evals = []

    def evaluate(state):
        evals.append(float(state["w"]))
        return {"eval/w": float(state["w"])}

    with open_run(str(tmp_path), run_config={"a": 1}, checkpoint=CKPT, model_config=None) as run:
        assert run.restore_step is None
        result = _fit(run, steps=5, evaluate=evaluate)
        assert run.checkpointer.all_steps() == [2, 4, 5]
        _, extras = run.checkpointer.restore({"params": jax.eval_shape(lambda: result.state)}, step=4)
    assert extras == {"data": {"position": 4}}
    assert result.step == 5 and result.stopped_by is None
    # w_k = 0.9 w_{k-1} + 0.1 k
    w = 0.0
    expected = []
    for k in range(1, 6):
        w = 0.9 * w + 0.1 * k
        expected.append(w)
    np.testing.assert_allclose(float(result.state["w"]), expected[-1], rtol=1e-6)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in records if "eval/w" in r] == [0, 2, 4, 5]  # baseline at step 0, every 2, final
    np.testing.assert_allclose(evals, [0.0, expected[1], expected[3], expected[4]], rtol=1e-6)
    assert result.last_eval == {"eval/w": pytest.approx(expected[-1])}
    assert os.path.exists(tmp_path / "config.json")


def test_resume_continues_and_rewrites_later_metrics(tmp_path):
    with open_run(str(tmp_path), run_config={}, checkpoint=CKPT, model_config=None) as run:
        full = _fit(run, steps=4)
    # Pretend the process died after logging step 4 but with only checkpoint 2 on disk.
    with open_run(str(tmp_path), run_config={}, checkpoint=CKPT, model_config=None) as run:
        restored, extras = run.checkpointer.restore({"params": jax.eval_shape(lambda: full.state)}, step=2)
        batches = Counter()
        batches.position = extras["data"]["position"]
        resumed = _fit(run, steps=4, start=2, state=restored["params"], batches=batches)
    assert float(resumed.state["w"]) == float(full.state["w"])
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_each_eval_line_says_what_share_of_the_held_out_set_it_read(tmp_path, capsys):
    """`held_out` (what the recipe's eval batches hold) goes into every `eval @ step N` line, as a plain
    line (no WARNING); without it the line is as before."""
    from rlhf_jax.train.data import HeldOut

    evaluate = lambda s: {"eval/w": 0.25}  # noqa: E731
    with open_run(str(tmp_path / "a"), run_config={}, checkpoint=CKPT, model_config=None) as run:
        fit(state={"w": jnp.zeros(()), "step": jnp.int32(0)}, step_fn=_toy_step, batches=Counter(), start_step=0,
            train=TrainConfig(steps=2, eval_every=0), checkpoint=CKPT, logging=QUIET, run=run,
            save_items=lambda s: {"params": s}, extras=lambda: {}, evaluate=evaluate,
            held_out=HeldOut(batches=[], examples=32, total=120))
    lines = [re.sub(r"\(\d+\.\ds", "(Ts", line) for line in capsys.readouterr().err.splitlines()]
    assert lines == ["eval @ step 0 (Ts, 32 of 120 held-out examples): eval/w=0.25",
                     "eval @ step 2 (Ts, 32 of 120 held-out examples): eval/w=0.25"]
    with open_run(str(tmp_path / "b"), run_config={}, checkpoint=CKPT, model_config=None) as run:
        _fit(run, steps=1, evaluate=evaluate)
    assert [re.sub(r"\(\d+\.\ds", "(Ts", line) for line in capsys.readouterr().err.splitlines()] == [
        "eval @ step 0 (Ts): eval/w=0.25", "eval @ step 1 (Ts): eval/w=0.25"]


def test_a_finished_run_reports_its_last_logged_metrics(tmp_path):
    with open_run(str(tmp_path), run_config={}, checkpoint=CKPT, model_config=None) as run:
        first = _fit(run, steps=4, evaluate=lambda s: {"eval/w": float(s["w"])})
    calls = []
    with open_run(str(tmp_path), run_config={}, checkpoint=CKPT, model_config=None) as run:
        again = _fit(run, steps=4, start=4, state=first.state, evaluate=lambda s: calls.append(1) or {})
    assert calls == [] and again.step == 4 and again.stopped_by is None
    assert again.last_eval == first.last_eval and again.last_metrics == first.last_metrics
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2, 2, 3, 4, 4]


def test_a_resume_with_another_config_says_what_changed_and_keeps_the_old_one(tmp_path, capsys):
    before = {"name": "x", "optim": {"learning_rate": 0.003, "betas": (0.9, 0.95)}, "train": {"steps": 2}}
    with open_run(str(tmp_path), run_config=before, checkpoint=CKPT, model_config=None) as run:
        assert run.config_changes == ()
        first = _fit(run, steps=2)
    after = {"name": "x", "optim": {"learning_rate": 0.01, "betas": (0.9, 0.95)}, "train": {"steps": 4}, "new": None}
    with open_run(str(tmp_path), run_config=after, checkpoint=CKPT, model_config=None) as run:
        # tuples compare as the lists config.json holds; a key only one side has is "(absent)" there
        assert run.config_changes == ("new: (absent) -> null", "optim.learning_rate: 0.003 -> 0.01",
                                      "train.steps: 2 -> 4")
        _fit(run, steps=4, start=2, state=first.state)
    assert ("the config differs from the one steps 1-2 ran with: new: (absent) -> null; optim.learning_rate: "
            "0.003 -> 0.01; train.steps: 2 -> 4 (that one is kept as config.until_step_2.json)"
            ) in capsys.readouterr().err
    assert json.loads((tmp_path / "config.until_step_2.json").read_text()) == json_ready(before)
    assert json.loads((tmp_path / "config.json").read_text()) == json_ready(after)
    with open_run(str(tmp_path), run_config=after, checkpoint=CKPT, model_config=None) as run:
        assert run.config_changes == ()  # resumed again with the same config: nothing to report
    (tmp_path / "config.json").write_text('{"name": "x", "optim": ')  # edited by hand, badly
    with open_run(str(tmp_path), run_config=after, checkpoint=CKPT, model_config=None) as run:
        assert len(run.config_changes) == 1 and run.config_changes[0].startswith("config.json: not readable as JSON")
        run.record_config()
    assert (tmp_path / "config.until_step_4.json").read_text() == '{"name": "x", "optim": '  # kept byte for byte
    assert json.loads((tmp_path / "config.json").read_text()) == json_ready(after)


def test_a_refused_or_repeated_resume_keeps_the_config_record_true(tmp_path):
    first = {"optim": {"name": "adamw"}, "train": {"steps": 2}}
    with open_run(str(tmp_path), run_config=first, checkpoint=CKPT, model_config=None) as run:
        state = _fit(run, steps=2).state
    record = (tmp_path / "config.json").read_bytes()
    # A rerun refused before training (its checkpoint does not restore, a bad setting) writes nothing.
    with open_run(str(tmp_path), run_config={**first, "optim": {"name": "sgd"}}, checkpoint=CKPT,
                  model_config=None) as run:
        assert run.config_changes == ('optim.name: "adamw" -> "sgd"',)
    assert (tmp_path / "config.json").read_bytes() == record and not (tmp_path / "config.until_step_2.json").exists()
    # Two accepted resumes from step 2 with other configs (the first crashed before its next
    # checkpoint): both compare with, and keep, what steps 1-2 ran with.
    for steps in (3, 4):
        again = {**first, "train": {"steps": steps}}
        with open_run(str(tmp_path), run_config=again, checkpoint=CheckpointConfig(every=0, async_save=False),
                      model_config=None) as run:
            assert run.config_changes == (f"train.steps: 2 -> {steps}",)
            run.record_config()
        assert (tmp_path / "config.until_step_2.json").read_bytes() == record
        assert json.loads((tmp_path / "config.json").read_text()) == json_ready(again)
    with open_run(str(tmp_path), run_config=again, checkpoint=CKPT, model_config=None) as run:
        _fit(run, steps=4, start=2, state=state)
    with open_run(str(tmp_path), run_config=again, checkpoint=CKPT, model_config=None) as run:
        assert run.restore_step == 4 and run.config_changes == ()


def test_a_best_metric_the_evaluation_does_not_report_is_an_error_at_the_first_evaluation(tmp_path):
    keep_best = CheckpointConfig(every=2, keep_best=1, best_metric="eval/nope", async_save=False)
    with open_run(str(tmp_path), run_config={}, checkpoint=keep_best, model_config=None) as run:
        with pytest.raises(ConfigError, match=r"checkpoint.best_metric='eval/nope' is not a metric this run's "
                                              r"evaluation reports; it reports: eval/loss, eval/w"):
            _fit(run, steps=4, checkpoint=keep_best, evaluate=lambda s: {"eval/w": 1.0, "eval/loss": 0.5})
        assert run.checkpointer.all_steps() == []  # the baseline evaluation, before any step


def test_existing_checkpoints_without_resume_is_an_error(tmp_path):
    with open_run(str(tmp_path), run_config={}, checkpoint=CKPT, model_config=None) as run:
        _fit(run, steps=2)
    with pytest.raises(ConfigError, match="already holds checkpoints and checkpoint.resume=false"):
        open_run(str(tmp_path), run_config={}, checkpoint=CheckpointConfig(resume=False), model_config=None)


def test_sigterm_finishes_the_step_saves_and_returns(tmp_path):
    def step_fn(state, batch):
        state, metrics = _toy_step(state, batch)
        if int(batch["x"][0]) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return state, metrics

    previous = signal.getsignal(signal.SIGTERM)
    with open_run(str(tmp_path), run_config={}, checkpoint=CKPT, model_config=None) as run:
        result = _fit(run, steps=10, step_fn=step_fn,
                      checkpoint=CheckpointConfig(every=0, async_save=False))
        assert run.checkpointer.all_steps() == [3]
    assert result.stopped_by == "SIGTERM" and result.step == 3
    assert signal.getsignal(signal.SIGTERM) is previous  # handler restored


def test_sigterm_before_the_first_step_saves_nothing(tmp_path):
    def evaluate(state):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during the baseline evaluation
        return {"eval/w": 0.0}

    with open_run(str(tmp_path), run_config={}, checkpoint=CKPT, model_config=None) as run:
        result = _fit(run, steps=10, evaluate=evaluate)
        assert run.checkpointer.all_steps() == []
    assert result.stopped_by == "SIGTERM" and result.step == 0


def test_a_second_sigterm_while_the_last_checkpoint_is_written_is_only_noted(tmp_path):
    def step_fn(state, batch):
        state, metrics = _toy_step(state, batch)
        if int(batch["x"][0]) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return state, metrics

    with open_run(str(tmp_path), run_config={}, checkpoint=CKPT, model_config=None) as run:
        wait = run.checkpointer.wait

        def wait_and_be_signalled():
            os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's second notice, during the final save
            wait()

        run.checkpointer.wait = wait_and_be_signalled
        result = _fit(run, steps=10, step_fn=step_fn, checkpoint=CheckpointConfig(every=0, async_save=True))
        assert run.checkpointer.all_steps() == [2]
    assert result.stopped_by == "SIGTERM" and result.step == 2


def test_signals_outside_training_raise_and_a_swallowed_one_stops_the_next_fit(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as caught, interrupt_outside_training():
        os.kill(os.getpid(), signal.SIGTERM)  # setup or compilation: the command ends at once
    assert caught.value.signal_name == "SIGTERM" and signal.getsignal(signal.SIGTERM) is previous
    with interrupt_outside_training() as outside:
        with open_run(str(tmp_path), run_config={}, checkpoint=CKPT, model_config=None) as run:
            trained = _fit(run, steps=2)  # inside fit a signal stops at a step instead (above)
            assert signal.getsignal(signal.SIGINT) == outside._handle  # put back after fit
            try:
                os.kill(os.getpid(), signal.SIGINT)
            except Interrupted:
                pass  # as Python does with an exception raised in a garbage-collector callback
            result = _fit(run, steps=10, start=2, state=trained.state)
    assert result.stopped_by == "SIGINT" and result.step == 2


def test_second_sigint_interrupts():
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def _nan_at(k, policy_key):
    def step_fn(state, batch):
        state, metrics = _toy_step(state, batch)
        bad = jnp.float32(int(batch["x"][0]) == k)
        return state, {**metrics, "loss": jnp.where(bad > 0, jnp.nan, metrics["loss"]), "nonfinite": bad,
                       **({"halt": bad} if policy_key == "halt" else {})}

    return step_fn


def test_halt_policy_names_the_step(tmp_path):
    with open_run(str(tmp_path), run_config={}, checkpoint=CKPT, model_config=None) as run:
        with pytest.raises(TrainingHalted, match=r"step 3: non-finite loss or gradient \(loss=nan"):
            _fit(run, steps=6, step_fn=_nan_at(3, "halt"), train=TrainConfig(steps=6, nonfinite="halt"),
                 logging=LoggingConfig(console=False, tensorboard=False, every=2))
        assert run.checkpointer.all_steps() == [2]  # nothing saved after the bad step
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["step"] == 3


def test_skip_policy_reports_and_continues(tmp_path):
    stream = io.StringIO()
    logging = LoggingConfig(tensorboard=False, jsonl=True)
    with open_run(str(tmp_path), run_config={}, checkpoint=CKPT, model_config=None) as run:
        from rlhf_jax import metrics as metrics_module

        original = metrics_module.ProgressBar.__init__

        def quiet_init(self, *args, **kwargs):
            original(self, *args, **{**kwargs, "stream": stream})

        metrics_module.ProgressBar.__init__ = quiet_init
        try:
            result = _fit(run, steps=4, step_fn=_nan_at(2, "skip"), logging=logging)
        finally:
            metrics_module.ProgressBar.__init__ = original
    assert result.step == 4
    assert "step 2: non-finite loss or gradient; update skipped" in stream.getvalue()


def test_fit_bounds_the_steps_in_flight_on_an_8_device_collective_step(tmp_path):
    """Steps dispatched without a host sync (logging.every > steps) stay at most `MAX_IN_FLIGHT`
    ahead. Unbounded, XLA:CPU with 8 host devices on a host with < 16 cores aborts once ~32
    all-reduce steps are in flight (its 8 client threads, a per-device limit of 32 unfinished
    programs: launches blocked on the limit hold the threads an earlier all-reduce needs); this
    run did so on the 2-core CI host without the window."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from rlhf_jax.train.loop import MAX_IN_FLIGHT, InFlight

    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert mesh.size == 8 and MAX_IN_FLIGHT < 32
    rows = jax.device_put(np.random.default_rng(0).normal(size=(512, 256)).astype(np.float32),
                          NamedSharding(mesh, P("data")))

    class Rows:
        def __next__(self):
            return {"x": rows}

        def get_state(self):
            return {}

    @jax.jit
    def step_fn(state, batch):
        h = batch["x"]
        for _ in range(5):  # enough work per step that dispatch runs ahead of execution
            h = jnp.tanh(h @ state["w"])
        g = jnp.mean(h)  # an all-reduce over the 8 devices
        return {"w": state["w"] - 1e-3 * g}, {"loss": g}

    state = {"w": jax.device_put(jnp.eye(256) * 0.5, NamedSharding(mesh, P()))}
    window, outs = InFlight(limit=2), []  # the window itself: adding output n + limit waits for output n
    for _ in range(3):
        outs.append(step_fn(state, {"x": rows})[1]["loss"])
        window.add(outs[-1])
    assert outs[0].is_ready()
    with open_run(str(tmp_path), run_config={}, checkpoint=CKPT, model_config=None) as run:
        result = _fit(run, steps=64, state=state, step_fn=step_fn, batches=Rows(),
                      checkpoint=CheckpointConfig(every=0, async_save=False),
                      logging=LoggingConfig(every=1000, console=False, tensorboard=False), train=TrainConfig(steps=64))
    assert result.step == 64
    losses = [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    expected = []  # the same steps run one at a time
    for _ in range(64):
        state, metrics = step_fn(state, {"x": rows})
        expected.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, expected, rtol=1e-6, atol=0)
    np.testing.assert_allclose(result.state["w"], state["w"], rtol=1e-6)


@pytest.mark.parametrize("mode, values, best", [("max", [0.5, 0.9, math.nan, 0.7, 0.6, 0.1], 1),
                                                ("min", [0.5, 0.8, math.nan, 0.2, 0.3, 0.9], 3)])
def test_a_nan_evaluation_does_not_cost_the_best_checkpoint(tmp_path, mode, values, best):
    """Evaluations at steps 0 (baseline) to 5; step 2's metric is NaN. Orbax's BestN sorted the NaN
    among the numbers and deleted the best checkpoint (step 1 kept [3, 5] under "max")."""
    evals = iter(values)
    ckpt = CheckpointConfig(every=0, keep=1, keep_best=1, best_metric="eval/m", best_mode=mode, async_save=False)
    with open_run(str(tmp_path), run_config={}, checkpoint=ckpt, model_config=None) as run:
        _fit(run, steps=5, evaluate=lambda s: {"eval/m": next(evals)}, train=TrainConfig(steps=5, eval_every=1),
             checkpoint=ckpt)
        assert run.checkpointer.all_steps() == [best, 5] and run.checkpointer.best_step() == best
    # The NaN is reported, not dropped.
    [at_2] = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["step"] == 2 and "eval/m" in r]
    assert math.isnan(at_2["eval/m"])
