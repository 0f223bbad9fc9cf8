"""Device meshes, sharding strategies as data, parameter / batch placement (the lint: `sharding_lint`).

A *strategy* is a rule table: for each logical axis name a model annotates its parameters with
(`vocab`, `embed`, `mlp`, `q_heads`, `kv_heads`, `head_dim`, `layers`), the mesh axes that dimension
is split over; plus the mesh axes the batch dimension is split over. Nothing in the model or the
steps changes between strategies (MaxText's logical-axis rules; GSPMD, Xu et al. 2021). The rule tables,
their registry and the built-in strategies live in `rlhf_jax.sharding_strategies` (re-exported here).

Built-in strategies on the standard mesh axes `data`, `fsdp`, `tensor`:

| strategy  | batch split over | parameters split over                                       |
|-----------|------------------|-------------------------------------------------------------|
| `dp`      | data, fsdp       | replicated                                                  |
| `fsdp`    | data, fsdp       | `embed` over fsdp (ZeRO-3 style; Rajbhandari et al. 2020)  |
| `tp`      | data, fsdp       | heads, `mlp`, `vocab` over tensor (Megatron; Shoeybi et al. 2019) |
| `fsdp_tp` | data, fsdp       | `embed` over fsdp and heads, `mlp`, `vocab` over tensor     |

Example:
    >>> mesh = make_mesh({"fsdp": 4, "tensor": 2})          # data=1 filled in
    >>> shardings = param_shardings(lm.abstract_params(), lm.logical_axes, mesh=mesh, strategy="fsdp_tp")
    >>> params = jax.jit(lm.init, out_shardings=shardings)(jax.random.key(0))
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rlhf_jax.sharding_strategies import (
    MeshAxes,
    ShardingError,
    Strategy,
    check_strategy,
    get_strategy,
    register_strategy,
    strategy_names,
)

__all__ = [
    "STANDARD_AXES",
    "MeshConfig",
    "Strategy",
    "ShardingError",
    "make_mesh",
    "register_strategy",
    "get_strategy",
    "strategy_names",
    "partition_spec",
    "param_shardings",
    "replicated",
    "batch_sharding",
    "batch_axis_size",
    "check_batch",
    "shard_batch",
    "place_rows",
    "local_rows",
    "apply_to_local_rows",
    "check_strategy",
    "activation_sharding",
    "constrain_activations",
]

STANDARD_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# ------------------------------------------------------------------------------------------ meshes


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Shape of the device mesh and the sharding strategy, as an experiment config section.

    Attributes:
      data: size of the `data` axis; -1 = all devices not used by the other axes.
      fsdp: size of the `fsdp` axis (parameters and batch both split over it under `fsdp`).
      tensor: size of the `tensor` axis (tensor parallelism).
      strategy: a registered strategy name (`dp`, `fsdp`, `tp`, `fsdp_tp`, or user-registered).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    strategy: str = "fsdp"

    def __post_init__(self):
        for name in STANDARD_AXES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
                raise ShardingError(f"MeshConfig.{name} must be a positive int or -1, got {value!r}")
        free = [n for n in STANDARD_AXES if getattr(self, n) == -1]
        if len(free) > 1:  # data defaults to -1: giving another axis -1 needs data set too
            raise ShardingError(
                f"MeshConfig: at most one of data, fsdp, tensor may be -1, got {', '.join(f'{n}=-1' for n in free)}; "
                f"set {free[0]} to a size (e.g. {free[0]}=1) to give {free[-1]} the remaining devices")
        get_strategy(self.strategy)

    @property
    def shape(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in STANDARD_AXES}

    def make_mesh(self, devices: Sequence[Any] | None = None) -> Mesh:
        """The mesh over `devices` (default: all of `jax.devices()`)."""
        return make_mesh(self.shape, devices=devices)


def make_mesh(shape: Mapping[str, int] | None = None, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A device mesh with `Auto` axis types; the standard axes data/fsdp/tensor are always present.

    Axes missing from `shape` get size 1 (so every built-in strategy applies to every mesh made
    here); one axis may be -1 and takes the remaining devices. Extra user-defined axes follow the
    standard ones, in the order given.

    Args:
      shape: mesh axis name -> size, e.g. `{"data": 2, "fsdp": 4}`; default `{"data": -1}`.
      devices: the devices to lay out (default `jax.devices()`); e.g. a TPU topology's
        compile-only devices for ahead-of-time compilation.

    Returns:
      A `jax.sharding.Mesh` whose device count equals `len(devices)`.

    Raises:
      ShardingError: a non-positive size, more than one -1, or sizes whose product is not the
        device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ShardingError("make_mesh: devices is empty; pass at least one device (default: jax.devices())")
    shape = dict({"data": -1} if shape is None else shape)
    for name, size in shape.items():
        if not isinstance(name, str) or not name:
            raise ShardingError(f"make_mesh: axis names must be non-empty strings, got {name!r}")
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ShardingError(f"make_mesh: axis {name!r} must have a positive size or -1, got {size!r}")
    names = list(STANDARD_AXES) + [n for n in shape if n not in STANDARD_AXES]
    sizes = {n: int(shape.get(n, 1)) for n in names}
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ShardingError(f"make_mesh: at most one axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % fixed:
            raise ShardingError(
                f"make_mesh: {len(devices)} devices cannot fill axis {free[0]!r}: the other axes "
                f"{ {n: s for n, s in sizes.items() if s != -1} } need a multiple of {fixed} devices"
            )
        sizes[free[0]] = len(devices) // fixed
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ShardingError(
            f"make_mesh: mesh shape {sizes} has {total} devices but {len(devices)} are available "
            f"({devices[0].platform if devices else 'none'}); make the product of the axis sizes "
            f"equal the device count, or use -1 for one axis"
        )
    return jax.make_mesh(
        tuple(sizes[n] for n in names),
        tuple(names),
        axis_types=(AxisType.Auto,) * len(names),
        devices=devices,
    )


# --------------------------------------------------------------------------------- parameter specs


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def partition_spec(
    logical: Sequence[str | None], shape: Sequence[int], *, mesh: Mesh, strategy: str | Strategy
) -> tuple[PartitionSpec, list[str]]:
    """The `PartitionSpec` of one array from its logical axis names, and its divisibility problems.

    Each dimension takes the mesh axes of its logical name's rule, minus axes of size 1 and axes an
    earlier dimension of the same array already uses.

    Args:
      logical: one logical axis name (or None) per dimension.
      shape: the array's shape.
      mesh: the device mesh.
      strategy: a `Strategy` or registered name.

    Returns:
      `(spec, problems)`: problems lists, per dimension whose size is not a multiple of its mesh
      axes' total size, a sentence naming the dimension and the axes.
    """
    strategy = get_strategy(strategy)
    if isinstance(logical, str):
        raise ShardingError(f"logical axes must be a sequence with one name per dimension, got the string "
                            f"{logical!r}; write ({logical!r},)")
    if len(logical) != len(shape):
        raise ShardingError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    table = strategy.rule_table
    used: set[str] = set()
    spec, problems = [], []
    for dim, (name, size) in enumerate(zip(logical, shape)):
        axes = tuple(
            a for a in (table.get(name, ()) if name is not None else ())
            if a not in used and mesh.shape.get(a, 1) > 1
        )
        used.update(axes)
        split = math.prod(mesh.shape[a] for a in axes)
        if axes and size % split:
            problems.append(
                f"dimension {dim} ({name}, size {size}) is not divisible by mesh axes "
                f"{axes} (total size {split})"
            )
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec), problems


def _specs(abstract_params, logical_axes, mesh: Mesh, strategy: Strategy):
    """(tree of PartitionSpec, list of (path, problem)) for a parameter tree."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    axes_leaves = treedef.flatten_up_to(logical_axes) if leaves else []
    specs, problems = [], []
    for (path, leaf), names in zip(leaves, axes_leaves):
        if isinstance(names, str):
            raise ShardingError(f"parameter {_path_str(path)}: logical axes must be a tuple with one name per "
                                f"dimension, got the string {names!r}; write ({names!r},)")
        names = tuple(names)
        unknown_names = [n for n in names if n is not None and not isinstance(n, str)]
        if unknown_names:
            raise ShardingError(f"parameter {_path_str(path)}: logical axes must be strings, got {names}")
        if len(names) != len(leaf.shape):
            raise ShardingError(
                f"parameter {_path_str(path)} has shape {tuple(leaf.shape)} but logical axes {names}"
            )
        spec, bad = partition_spec(names, leaf.shape, mesh=mesh, strategy=strategy)
        specs.append(spec)
        problems.extend((_path_str(path), p) for p in bad)
    return jax.tree_util.tree_unflatten(treedef, specs), problems


def _check_trees(abstract_params, logical_axes) -> None:
    p_struct = jax.tree_util.tree_structure(abstract_params)
    a_struct = jax.tree_util.tree_structure(logical_axes, is_leaf=lambda x: isinstance(x, tuple))
    if p_struct != a_struct:
        raise ShardingError(
            "logical_axes must have the same tree structure as the parameters (one tuple of axis "
            f"names per array); got {a_struct} for parameters {p_struct}"
        )


def param_shardings(abstract_params, logical_axes, *, mesh: Mesh, strategy: str | Strategy):
    """`NamedSharding`s for every parameter, from its logical axis names and the strategy's rules.

    Args:
      abstract_params: the parameter tree (arrays or `jax.ShapeDtypeStruct`s).
      logical_axes: the same tree with a tuple of logical axis names per array
        (`CausalLM.logical_axes`).
      mesh: the device mesh.
      strategy: a `Strategy` or registered name.

    Returns:
      A tree like `abstract_params` of `NamedSharding`.

    Raises:
      ShardingError: the strategy names an axis the mesh lacks, the trees differ, or a dimension is
        not divisible by the mesh axes it is split over (all such dimensions are listed).
    """
    strategy = check_strategy(strategy, mesh)
    _check_trees(abstract_params, logical_axes)
    specs, problems = _specs(abstract_params, logical_axes, mesh, strategy)
    if problems:
        lines = "\n  ".join(f"{path}: {p}" for path, p in problems)
        raise ShardingError(
            f"strategy {strategy.name!r} on mesh {dict(mesh.shape)} cannot split these parameters "
            f"evenly:\n  {lines}\nChoose mesh sizes that divide them, or a strategy that leaves "
            "these logical axes unsplit."
        )
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on `mesh` (scalars, step counters, rng keys)."""
    return NamedSharding(mesh, PartitionSpec())


# ------------------------------------------------------------------------------------------ batches


def _present_batch_axes(mesh: Mesh, strategy: Strategy) -> MeshAxes:
    return tuple(a for a in strategy.batch_axes if mesh.shape.get(a, 1) > 1)


def batch_axis_size(mesh: Mesh, strategy: str | Strategy) -> int:
    """How many ways the batch dimension is split: the product of the strategy's batch axes."""
    strategy = check_strategy(strategy, mesh)
    return math.prod(mesh.shape[a] for a in _present_batch_axes(mesh, strategy))


def batch_sharding(mesh: Mesh, strategy: str | Strategy) -> NamedSharding:
    """The sharding of batch arrays: leading dimension split over the strategy's batch axes."""
    strategy = check_strategy(strategy, mesh)
    axes = _present_batch_axes(mesh, strategy)
    return NamedSharding(mesh, PartitionSpec(axes if len(axes) > 1 else (axes[0] if axes else None)))


def check_batch(batch: Mapping[str, Any], *, mesh: Mesh, strategy: str | Strategy, micro_batches: int = 1) -> int:
    """Check that every batch array has one leading size divisible by the data split; return it.

    Args:
      batch: mapping of name -> array (numpy, jax or ShapeDtypeStruct), each `[B, ...]`.
      mesh: the device mesh.
      strategy: a `Strategy` or registered name.
      micro_batches: gradient-accumulation micro-batches (each must also split evenly).

    Returns:
      The batch size `B`.

    Raises:
      ShardingError: naming the key whose shape is wrong.
    """
    if not isinstance(batch, Mapping) or not batch:
        raise ShardingError(f"batch must be a non-empty mapping of arrays, got {type(batch).__name__}")
    if not isinstance(micro_batches, (int, np.integer)) or isinstance(micro_batches, bool) or micro_batches < 1:
        raise ShardingError(f"check_batch: micro_batches must be an int >= 1, got {micro_batches!r}")
    ways = batch_axis_size(mesh, strategy)
    need = ways * micro_batches
    size = None
    for key, value in batch.items():
        shape = tuple(np.shape(value)) if not hasattr(value, "shape") else tuple(value.shape)
        if not shape:
            raise ShardingError(f"batch[{key!r}] is a scalar; every batch array needs a leading batch dimension")
        if size is None:
            size, first = shape[0], key
        elif shape[0] != size:
            raise ShardingError(
                f"batch[{key!r}] has leading size {shape[0]} but batch[{first!r}] has {size}; all "
                "batch arrays share the batch dimension"
            )
    if size % need:
        raise ShardingError(
            f"batch size {size} (batch[{first!r}]) is not divisible by {need} = {ways} data-parallel "
            f"shards (mesh {dict(mesh.shape)}, strategy {get_strategy(strategy).name!r} batch axes "
            f"{tuple(get_strategy(strategy).batch_axes)}) x {micro_batches} micro-batches"
        )
    return size


def shard_batch(batch: Mapping[str, Any], *, mesh: Mesh, strategy: str | Strategy, micro_batches: int = 1):
    """Place a host batch (numpy arrays) on the mesh, each device receiving only its rows.

    In a multi-process run each process passes its own rows, and the global batch is their
    concatenation (`jax.make_array_from_process_local_data`).
    """
    sharding = batch_sharding(mesh, strategy)
    if jax.process_count() == 1:
        check_batch(batch, mesh=mesh, strategy=strategy, micro_batches=micro_batches)
        return jax.device_put(dict(batch), sharding)
    # Every process holds an equal block of rows; the checks are about the global batch.
    n = jax.process_count()
    global_shapes = {k: jax.ShapeDtypeStruct((np.shape(v)[0] * n, *np.shape(v)[1:]), np.asarray(v).dtype)
                     for k, v in batch.items()}
    check_batch(global_shapes, mesh=mesh, strategy=strategy, micro_batches=micro_batches)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), global_shapes[k].shape)
            for k, v in batch.items()}


def place_rows(arrays, mesh: Mesh, strategy: str | Strategy):
    """Host arrays split over the batch axes by their first dimension (each process gives its own rows)."""
    sharding = batch_sharding(mesh, strategy)
    if jax.process_count() == 1:
        return jax.device_put(arrays, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), arrays)


def local_rows(x: jax.Array | np.ndarray) -> np.ndarray:
    """This process's rows of an array split over the batch axes by its first dimension, as numpy.

    The inverse of `place_rows` / `shard_batch`: one process gets the whole array, process p of a
    multi-process run the block its devices hold (shards repeated over other mesh axes counted once).
    A host (numpy) array is already this process's rows (e.g. continuous batching's outputs).
    """
    if jax.process_count() == 1 or not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    blocks = {}
    for shard in x.addressable_shards:
        start = (shard.index[0].start or 0) if shard.index else 0
        blocks.setdefault(start, shard.data)
    return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)])


def apply_to_local_rows(fn, arrays: Sequence[Any], *, mesh: Mesh, strategy: str | Strategy) -> np.ndarray:
    """`fn(*arrays)` over this process's host rows (first dimension), its own rows of the result back.

    One process: `fn` on the arrays as they are. N processes (every process calls this, with its own
    rows): each pads its rows, repeating its first row (a row of ones when it has none), to the most
    any process holds, rounded up to a multiple of its devices on the batch axes, so that they form
    one global batch (`place_rows`); the result's padding rows are dropped (`local_rows`). Passing
    host rows to a jitted `fn` directly would instead treat each process's rows as the whole batch.
    """
    arrays = [np.asarray(a) for a in arrays]
    n = arrays[0].shape[0]
    if jax.process_count() == 1:
        return np.asarray(fn(*arrays))
    from rlhf_jax.distributed import max_over_processes  # noqa: PLC0415

    per_process = max(1, batch_axis_size(mesh, strategy) // jax.process_count())
    rows = -(-max(int(max_over_processes([n])[0]), 1) // per_process) * per_process
    if rows > n:
        pad = rows - n
        arrays = [np.concatenate([a, np.repeat(a[:1], pad, axis=0)]) if n else np.ones((pad, *a.shape[1:]), a.dtype)
                  for a in arrays]
    return local_rows(fn(*place_rows(arrays, mesh, strategy)))[:n]


# ------------------------------------------------------------------------------------- activations

_ACTIVATIONS: contextvars.ContextVar[tuple[Mesh, Strategy] | None] = contextvars.ContextVar(
    "rlhf_jax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, strategy: str | Strategy):
    """While tracing inside this context, `constrain_activations` splits activations over the batch axes.

    The steps trace their update inside it, so the model's residual stream stays split like the
    batch: XLA then all-gathers FSDP-sharded weights per layer instead of all-reducing whole
    activations (GSPMD leaves that choice open without the constraint).
    """
    token = _ACTIVATIONS.set((mesh, check_strategy(strategy, mesh)))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def active_batch_split(batch: int) -> tuple[Mesh, MeshAxes] | None:
    """(mesh, batch axes) of the active `activation_sharding` context when it splits a batch of `batch`
    rows (a kernel that XLA cannot partition, e.g. a Pallas call, then runs per shard); else None."""
    active = _ACTIVATIONS.get()
    if active is None:
        return None
    mesh, strategy = active
    axes = _present_batch_axes(mesh, strategy)
    if not axes or batch % math.prod(mesh.shape[a] for a in axes):
        return None
    return mesh, axes


def constrain_activations(x: jax.Array, *, batch_dim: int = 0) -> jax.Array:
    """Constrain `x`'s `batch_dim` to the active strategy's batch axes (identity outside a context).

    Dimensions other than the batch stay unconstrained-replicated, as the residual stream is in
    data, FSDP and Megatron tensor parallelism alike. A batch not divisible by the data split
    (e.g. a single sequence while sampling) is left as it is.

    Args:
      x: an activation, e.g. the residual stream `[B, T, E]`.
      batch_dim: the batch dimension of `x`.

    Returns:
      `x`, with a sharding constraint when an `activation_sharding` context is active.
    """
    active = _ACTIVATIONS.get()
    if active is None:
        return x
    mesh, strategy = active
    axes = _present_batch_axes(mesh, strategy)
    ways = math.prod(mesh.shape[a] for a in axes)
    if not axes or x.shape[batch_dim] % ways:
        return x
    spec = [None] * x.ndim
    spec[batch_dim] = axes if len(axes) > 1 else axes[0]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))
