"""Sharding strategies as data: `Strategy` rule tables, their registry and the built-in ones.

A strategy maps each logical axis name a model annotates its parameters with (`LOGICAL_AXES`) to
the mesh axes that dimension is split over, plus the mesh axes of the batch; `dp`, `fsdp`, `tp` and
`fsdp_tp` are registered here (the table is in `rlhf_jax.sharding`'s docstring). `rlhf_jax.sharding`
re-exports every public name and places parameters and batches with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from jax.sharding import Mesh

LOGICAL_AXES: frozenset[str] = frozenset(
    {"vocab", "embed", "mlp", "q_heads", "kv_heads", "head_dim", "layers"}
)


class ShardingError(ValueError):
    """A mesh, strategy, parameter tree or batch cannot be placed; the message names the culprit."""


# -------------------------------------------------------------------------------------- strategies

MeshAxes = tuple[str, ...]


def _as_axes(where: str, value: str | Sequence[str] | None) -> MeshAxes:
    if value is None:
        return ()
    if isinstance(value, str):
        if not value:
            raise ShardingError(f"{where}: a mesh axis name is empty; use None (or omit the rule) for unsplit")
        return (value,)
    if not isinstance(value, Sequence):
        raise ShardingError(f"{where}: expected a mesh axis name, a sequence of them or None, got {value!r}")
    axes = tuple(value)
    if not all(isinstance(a, str) and a for a in axes):
        raise ShardingError(f"{where}: mesh axes must be strings, got {value!r}")
    if len(set(axes)) != len(axes):
        raise ShardingError(f"{where}: mesh axes repeat in {value!r}")
    return axes


@dataclasses.dataclass(frozen=True, kw_only=True)
class Strategy:
    """A sharding strategy: logical axis -> mesh axes rules, and the mesh axes of the batch.

    Attributes:
      name: registry name.
      rules: logical axis name -> mesh axis name(s) (a string, a tuple, or None = replicated).
        Logical axes not listed are replicated. Within one tensor a mesh axis is used at most
        once: a later dimension whose rule repeats an axis already used stays unsplit over it.
      batch_axes: mesh axes the leading (batch) dimension of every batch array is split over.
      description: one line for reports.

    Example:
        >>> register_strategy(Strategy(name="vocab_fsdp", rules={"vocab": "fsdp", "embed": "fsdp"}))
    """

    name: str
    rules: Mapping[str, str | Sequence[str] | None] = dataclasses.field(default_factory=dict)
    batch_axes: Sequence[str] = ("data", "fsdp")
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ShardingError(f"Strategy.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.rules, Mapping):
            raise ShardingError(f"Strategy {self.name!r}: rules must be a mapping, got {type(self.rules).__name__}")
        for k in self.rules:
            if not isinstance(k, str) or not k:
                raise ShardingError(f"Strategy {self.name!r}: rule keys must be logical axis names (non-empty "
                                    f"strings such as 'embed'), got {k!r}")
        rules = tuple(
            (k, _as_axes(f"Strategy {self.name!r} rule {k!r}", v)) for k, v in self.rules.items()
        )
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "batch_axes", _as_axes(f"Strategy {self.name!r} batch_axes", self.batch_axes))

    @property
    def rule_table(self) -> dict[str, MeshAxes]:
        return dict(self.rules)

    @property
    def param_axes(self) -> frozenset[str]:
        """Mesh axes that some rule splits parameters over."""
        return frozenset(a for _, axes in self.rules for a in axes)

    @property
    def mesh_axes(self) -> frozenset[str]:
        """Every mesh axis this strategy names (rules and batch)."""
        return self.param_axes | frozenset(self.batch_axes)


_REGISTRY: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    """Add `strategy` to the registry under its name; a duplicate name is an error."""
    if not isinstance(strategy, Strategy):
        raise TypeError(f"register_strategy: expected a Strategy, got {type(strategy).__name__}")
    if strategy.name in _REGISTRY:
        raise ShardingError(f"register_strategy: a strategy named {strategy.name!r} is already registered")
    _REGISTRY[strategy.name] = strategy
    return strategy


def get_strategy(strategy: str | Strategy) -> Strategy:
    """The registered strategy of that name (a `Strategy` passes through)."""
    if isinstance(strategy, Strategy):
        return strategy
    if strategy not in _REGISTRY:
        raise ShardingError(f"unknown sharding strategy {strategy!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[strategy]


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


_TENSOR_RULES = {"q_heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}

register_strategy(Strategy(name="dp", rules={}, description="data parallel: parameters replicated"))
register_strategy(Strategy(name="fsdp", rules={"embed": "fsdp"}, description="fully sharded data parallel"))
register_strategy(Strategy(name="tp", rules=_TENSOR_RULES, description="tensor parallel over heads / mlp / vocab"))
register_strategy(
    Strategy(name="fsdp_tp", rules={"embed": "fsdp", **_TENSOR_RULES}, description="fsdp x tensor parallel")
)


def check_strategy(strategy: str | Strategy, mesh: Mesh) -> Strategy:
    """The strategy, after checking that every mesh axis it names exists in `mesh`."""
    strategy = get_strategy(strategy)
    unknown = sorted(strategy.mesh_axes - set(mesh.axis_names))
    if unknown:
        raise ShardingError(
            f"strategy {strategy.name!r} names mesh axes {unknown} that the mesh lacks; "
            f"mesh axes: {dict(mesh.shape)}"
        )
    return strategy
