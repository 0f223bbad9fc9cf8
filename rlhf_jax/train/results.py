"""Results of an experiment: a JSON summary and a PNG plot beside the run's metrics.

    from rlhf_jax.metrics import read_jsonl
    write_json(run.file("results.json"), {...})
    plot_metrics(run.file("results.png"), read_jsonl(run.file("metrics.jsonl")),
                 [Panel("held-out accuracy", ("eval/accuracy",), target=0.9)], title="Reward Model Validation")
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from rlhf_jax.config import to_dict
from rlhf_jax.distributed import is_main

__all__ = ["ChecksMissed", "Panel", "check_passed", "json_ready", "write_json", "plot_metrics", "series"]


class ChecksMissed(RuntimeError):
    """An experiment ran to the end but missed acceptance checks it makes (`rlhf-jax run` exits 1)."""


def check_passed(experiment: str, passed: bool | Mapping[str, bool], results_path: str | os.PathLike) -> None:
    """Raise `ChecksMissed` naming the checks in `passed` (one bool, or check name -> bool) that failed.

    Call it after writing the results file, so that a missed check still leaves every figure on disk.
    """
    missed = ([] if passed else [experiment]) if isinstance(passed, bool) else [k for k, ok in passed.items() if not ok]
    if missed:
        raise ChecksMissed(f"{experiment} missed its checks: {', '.join(missed)} (figures in {os.fspath(results_path)})")


def _finite(x: Any) -> Any:
    """Non-finite floats as strings ("nan", "inf"), which strict JSON readers accept."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def json_ready(data: Any) -> Any:
    """`data` (a config dataclass, dict, ...) as the plain JSON value `write_json` writes and a reader
    loads back: dicts, lists (tuples too), strings, numbers, with non-finite floats as strings."""
    return json.loads(json.dumps(_finite(to_dict(data))))


def write_json(path: str | os.PathLike, data: Any) -> str:
    """Write `data` as indented, key-sorted JSON atomically (temporary file, then rename).

    In a multi-process run only process 0 writes (the others return the path).
    """
    path = os.fspath(path)
    if not is_main():
        return path
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(json_ready(data), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """`(steps, values)` of metric `key` over the metrics records that have it."""
    pairs = [(int(r["step"]), float(r[key])) for r in records if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Panel:
    """One subplot: metrics drawn against the step, with an optional target line.

    Attributes:
      title: the subplot title.
      keys: metric names to draw (one line each).
      target: a horizontal reference line (e.g. the acceptance threshold), or None.
      target_label: its legend label.
    """

    title: str
    keys: tuple[str, ...]
    target: float | None = None
    target_label: str = "target"


def plot_metrics(path: str | os.PathLike, records: Sequence[Mapping[str, Any]], panels: Sequence[Panel], *,
                 title: str) -> str:
    """Draw `panels` side by side from metrics records and save a PNG (matplotlib, Agg backend).

    Args:
      path: the PNG to write.
      records: metrics records (`rlhf_jax.metrics.read_jsonl`), each with a `step`.
      panels: what to draw.
      title: the figure title (e.g. "DPO baseline").
    Returns:
      `path` as a string (only process 0 of a multi-process run draws it).
    """
    if not is_main():
        return os.fspath(path)
    import matplotlib  # noqa: PLC0415 (slow import; only when plotting)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for key in panel.keys:
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        if panel.target is not None:
            ax.axhline(panel.target, color="gray", linestyle="--", linewidth=1, label=panel.target_label)
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
