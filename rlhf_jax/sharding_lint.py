"""The sharding lint: what a placement would fail on, and what it would waste, before compiling.

`lint(abstract_params, logical_axes, mesh=..., strategy=...)` returns `LintIssue`s: errors (a mesh
axis the mesh lacks, a dimension its mesh axes do not divide) that would make compilation fail,
and warnings (a large parameter left whole on every device, an idle mesh axis, a logical axis
name without a rule).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from collections.abc import Sequence
from typing import Literal

import jax
import numpy as np
from jax.sharding import Mesh

from rlhf_jax.sharding import Strategy, _check_trees, _path_str, _specs, get_strategy
from rlhf_jax.sharding_strategies import LOGICAL_AXES

__all__ = ["LintIssue", "lint", "format_lint", "warn_lint"]


@dataclasses.dataclass(frozen=True)
class LintIssue:
    """One finding of `lint`: `severity` "error" blocks compilation, "warning" is advice."""

    severity: Literal["error", "warning"]
    kind: Literal["indivisible", "replicated", "unused_axis", "unknown_axis", "unknown_logical_axis"]
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"


def lint(
    abstract_params,
    logical_axes,
    *,
    mesh: Mesh,
    strategy: str | Strategy,
    replicated_threshold_bytes: int = 1 << 20,
) -> list[LintIssue]:
    """Check a placement before compiling: what would fail, and what would waste memory or devices.

    Findings:
    - error `unknown_axis`: the strategy names a mesh axis the mesh lacks;
    - error `indivisible`: a parameter dimension is not a multiple of its mesh axes' total size;
    - warning `replicated`: a parameter of at least `replicated_threshold_bytes` is left whole on
      every device although the strategy splits parameters over a mesh axis of size > 1;
    - warning `unused_axis`: a mesh axis of size > 1 splits neither parameters nor the batch, so
      its devices repeat each other's work;
    - warning `unknown_logical_axis`: a parameter's logical axis name has no rule and is not one
      of the model's standard names (likely a typo in a user rule table's counterpart), or a rule of
      the strategy names a non-standard logical axis that no parameter has (a typo in the rule
      table: it splits nothing).

    Args:
      abstract_params: parameter tree of arrays or ShapeDtypeStructs.
      logical_axes: same tree of logical-axis-name tuples.
      mesh: the device mesh.
      strategy: a `Strategy` or registered name.
      replicated_threshold_bytes: size from which a replicated parameter is reported.

    Returns:
      A list of `LintIssue`, errors first.
    """
    strategy = get_strategy(strategy)
    issues: list[LintIssue] = []
    unknown = sorted(strategy.mesh_axes - set(mesh.axis_names))
    if unknown:
        return [LintIssue("error", "unknown_axis", f"strategy {strategy.name}",
                          f"names mesh axes {unknown} that mesh {dict(mesh.shape)} lacks")]
    _check_trees(abstract_params, logical_axes)
    specs, problems = _specs(abstract_params, logical_axes, mesh, strategy)
    issues += [LintIssue("error", "indivisible", path, p) for path, p in problems]
    param_split = any(mesh.shape[a] > 1 for a in strategy.param_axes)
    table = strategy.rule_table
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    axes_leaves = treedef.flatten_up_to(logical_axes)
    spec_leaves = treedef.flatten_up_to(specs)
    for (path, leaf), names, spec in zip(leaves, axes_leaves, spec_leaves):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        if param_split and not any(s is not None for s in spec) and nbytes >= replicated_threshold_bytes:
            issues.append(LintIssue(
                "warning", "replicated", _path_str(path),
                f"{nbytes / 2**20:.1f} MiB {tuple(leaf.shape)} with logical axes {tuple(names)} is "
                f"replicated on every device; add a rule for one of its axes to split it",
            ))
        for n in names:
            if n is not None and n not in table and n not in LOGICAL_AXES and n != "batch":
                issues.append(LintIssue(
                    "warning", "unknown_logical_axis", _path_str(path),
                    f"logical axis {n!r} has no rule in strategy {strategy.name!r} and is not a standard name",
                ))
    present = {n for names in axes_leaves for n in names if n is not None}
    for rule, axes in strategy.rules:
        if axes and rule not in present and rule not in LOGICAL_AXES:  # standard names: model-generic rules
            close = difflib.get_close_matches(rule, sorted(present), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            issues.append(LintIssue(
                "warning", "unknown_logical_axis", f"strategy {strategy.name} rule {rule!r}",
                f"no parameter has logical axis {rule!r}{hint}, so this rule splits nothing; the "
                f"parameters' logical axes: {sorted(present)}",
            ))
    used = set(strategy.batch_axes) | strategy.param_axes
    for axis, size in mesh.shape.items():
        if size > 1 and axis not in used:
            close = difflib.get_close_matches(axis, sorted(used - {axis}), n=1)
            hint = f" (a typo for {close[0]!r}?)" if close else ""
            issues.append(LintIssue(
                "warning", "unused_axis", f"mesh axis {axis}",
                f"size {size} splits neither parameters nor the batch under strategy "
                f"{strategy.name!r}: its devices repeat the same work{hint}",
            ))
    return sorted(issues, key=lambda i: i.severity != "error")


def format_lint(issues: Sequence[LintIssue]) -> str:
    """One line per finding, or 'sharding lint: clean'."""
    if not issues:
        return "sharding lint: clean"
    return "\n".join(str(i) for i in issues)


def warn_lint(issues: Sequence[LintIssue]) -> None:
    """Emit each warning-level finding as a Python warning (errors are raised elsewhere)."""
    for issue in issues:
        if issue.severity == "warning":
            warnings.warn(str(issue), stacklevel=3)
