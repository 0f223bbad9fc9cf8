"""bench_grpo's CPU-time marks (`_StepCpuMarks`): the process CPU clock at the k-th logged step.

The marks hook `MetricsLogger.log` (issue 23: a thread that re-read `metrics.jsonl` every 10 ms
cost ~2% of a W4 step's CPU time, charged to the step). They must count only step records (those
with `time/step`), each once, leave the records written as before, and restore the logger.
"""

import importlib.util
import os
import sys

from rlhf_jax.config import LoggingConfig
from rlhf_jax.metrics import MetricsLogger, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_grpo():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_grpo", os.path.join(ROOT, "benchmarks", "bench_grpo.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))


def test_step_cpu_marks_count_step_records(tmp_path):
    original = MetricsLogger.log
    logger = MetricsLogger(tmp_path, config=LoggingConfig(console=False, tensorboard=False), total_steps=4)
    marks = _bench_grpo()._StepCpuMarks((1, 3))
    try:
        logger.log(1, {"time/step": 0.5, "loss": 1.0})
        assert list(marks.marks) == [1]
        logger.log(1, {"eval/loss": 2.0})              # not a step record
        logger.log(2, {"time/step": 0.5})
        assert list(marks.marks) == [1]
        sum(range(200_000))                             # some CPU between the marks
        logger.log(3, {"time/step": 0.5})
        logger.log(4, {"time/step": 0.5})
    finally:
        marks.stop()
    logger.close()
    assert MetricsLogger.log is original
    assert sorted(marks.marks) == [1, 3] and marks.marks[1] < marks.marks[3]
    assert marks.cpu_per_step(1, 3) == (marks.marks[3] - marks.marks[1]) / 2
    assert marks.cpu_per_step(1, 4) is None
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 1, 2, 3, 4] and records[1] == {"step": 1, "eval/loss": 2.0}
