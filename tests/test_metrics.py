"""Metrics: buffered device metrics, JSONL/TensorBoard sinks, resume truncation, the progress line."""

import importlib.util
import io
import os

import jax.numpy as jnp
import pytest

from rlhf_jax.config import ConfigError, LoggingConfig
from rlhf_jax.metrics import MetricsBuffer, MetricsLogger, ProgressBar, format_duration, read_jsonl


def test_format_duration():
    assert format_duration(0) == "0:00"
    assert format_duration(59.6) == "1:00"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(float("nan")) == "?"
    assert format_duration(-1) == "?"


def test_buffer_fetches_scalars_once_in_order():
    buf = MetricsBuffer()
    buf.append(1, {"loss": jnp.float32(2.5), "n": jnp.int32(3), "vec": jnp.ones(3), "flag": jnp.bool_(True)})
    buf.append(2, {"loss": jnp.float32(1.25)})
    assert len(buf) == 2
    out = buf.flush()
    assert out == [(1, {"loss": 2.5, "n": 3, "flag": 1}), (2, {"loss": 1.25})]
    assert isinstance(out[0][1]["n"], int) and isinstance(out[0][1]["loss"], float)
    assert len(buf) == 0 and buf.flush() == []


def test_progress_line_rate_eta_and_metrics():
    bar = ProgressBar(100, keys=("loss", "rewards/accuracies", "absent"), stream=io.StringIO(), width=10)
    assert bar.line(25, {"loss": 0.123456, "rewards/accuracies": 0.75}) == (
        "[##--------] 25/100  25% - step/s ETA ? | loss 0.1235 rewards/accuracies 0.7500")
    bar.rate = 2.0
    assert bar.line(40, {"loss": 12345.0}) == "[####------] 40/100  40% 2.00 step/s ETA 0:30 | loss 1.234e+04"
    assert bar.line(100, {}) == "[##########] 100/100 100% 2.00 step/s ETA 0:00"


def test_progress_prints_lines_when_not_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar(3, keys=("loss",), stream=stream, min_interval=3600)
    for step in (1, 2, 3):
        bar.update(step, {"loss": 1.0 / step})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the first update, then the last (others are rate-limited)
    assert lines[0].startswith("[") and " 1/3 " in lines[0]
    assert " 3/3 100% " in lines[1] and "loss 0.3333" in lines[1] and "step/s" in lines[1]
    assert "\r" not in stream.getvalue()


def test_logger_writes_jsonl_and_tensorboard_and_truncates_on_resume(tmp_path):
    cfg = LoggingConfig(console=False)
    with MetricsLogger(tmp_path, config=cfg, total_steps=5) as log:
        for step in range(1, 6):
            log.log(step, {"loss": 1.0 / step, "skip_me": jnp.ones(2)})
        log.log(5, {"eval/acc": 0.5}, progress=False)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records[0] == {"step": 1, "loss": 1.0}
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 5]
    assert records[-1] == {"step": 5, "eval/acc": 0.5}
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))
    # A run resumed from step 3's checkpoint drops the records written after it.
    with MetricsLogger(tmp_path, config=cfg, total_steps=5, start_step=3) as log:
        log.log(4, {"loss": 0.2})
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_logger_console_shows_key_metrics(tmp_path):
    stream = io.StringIO()
    cfg = LoggingConfig(jsonl=False, tensorboard=False)
    with MetricsLogger(tmp_path, config=cfg, total_steps=2, keys=("loss",), stream=stream) as log:
        log.log(1, {"loss": 0.5})
        log.message("eval: accuracy 0.9")
    out = stream.getvalue()
    assert "1/2" in out and "loss 0.5000" in out and "eval: accuracy 0.9" in out
    assert not os.path.exists(tmp_path / "metrics.jsonl")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_requested_but_missing_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="logging.wandb=true but wandb is not installed"):
        MetricsLogger(tmp_path, config=LoggingConfig(wandb=True), total_steps=1)
