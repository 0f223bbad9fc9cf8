"""bench_grpo's CPU-time marks (`_StepCpuMarks`): the step counts read from a growing metrics file.

The poller reads only what was appended since its last poll (issue 23: re-reading the whole file
every 10 ms cost ~30 CPU ms per W4 step, charged to the step). It must count each step record
once, never a record whose line is not complete yet, and start over when the file is replaced.
"""

import importlib.util
import os
import sys
import time

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


def _wait(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.005)
    return cond()


def test_step_cpu_marks_count_complete_records_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    marks = _bench_grpo()._StepCpuMarks(str(path), (1, 2, 3))
    try:
        with open(path, "a") as f:
            f.write('{"step": 1, "time/step": 0.5, "loss": 1.0}\n{"step": 2, "eval/loss": 1.0}\n')
            f.flush()
            assert _wait(lambda: 1 in marks.marks)
            f.write('{"step": 2, "time/st')          # half a record: not counted yet
            f.flush()
            time.sleep(0.05)
            assert 2 not in marks.marks
            f.write('ep": 0.5}\n')
            f.flush()
            assert _wait(lambda: 2 in marks.marks)
            assert 3 not in marks.marks
            f.write('{"step": 3, "time/step": 0.5}\n{"step": 4, "time/step": 0.5}\n')
            f.flush()
            assert _wait(lambda: 3 in marks.marks)
    finally:
        marks.stop()
    assert marks.marks[1] <= marks.marks[2] <= marks.marks[3]
    assert marks.cpu_per_step(1, 3) == (marks.marks[3] - marks.marks[1]) / 2
    assert marks.cpu_per_step(1, 5) is None


def test_step_cpu_marks_start_over_on_a_new_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"time/step": 1}\n' * 3 + '{"note": "' + "x" * 200 + '"}\n')
    marks = _bench_grpo()._StepCpuMarks(str(path), (2, 4))
    try:
        assert _wait(lambda: 2 in marks.marks)
        path.write_text('{"time/step": 1}\n')            # replaced by a shorter file: 1 record
        time.sleep(0.05)
        with open(path, "a") as f:
            f.write('{"time/step": 1}\n' * 3)
        assert _wait(lambda: 4 in marks.marks)
    finally:
        marks.stop()
