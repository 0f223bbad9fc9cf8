"""Checkpoints of a whole training run with orbax's `CheckpointManager`.

A checkpoint at step `s` is the directory `<root>/<s>/` holding:
- one item per named pytree of the state (e.g. `params`, `train` = optimizer state, step and rng),
  each stored as a flat dict `{"path.to.leaf": array}` so any pytree (NamedTuples, optax states,
  typed PRNG keys) round-trips through the abstract target given at restore time;
- `extras`: JSON host state (data iterator position/epoch/seed, KL controller, ...);
- `meta`: JSON describing the model config and the PRNG key implementations.

Writes are asynchronous (training continues while arrays are written) and atomic: orbax writes to
a temporary directory and renames it when complete, so a crash during a save leaves the previous
checkpoints loadable and the partial one invisible (it is removed when the manager next opens).
Retention keeps the latest `keep` checkpoints plus the `keep_best` best by an eval metric.

Before restoring, every array's shape and dtype is compared with the target, and the saved model
config with the run's, so a checkpoint of another model fails with a clear message before any
compute.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_managers

from rlhf_jax.config import CheckpointConfig, to_dict

__all__ = [
    "Checkpointer",
    "CheckpointMismatchError",
    "flatten_tree",
    "unflatten_tree",
    "is_checkpoint_dir",
    "read_model_config",
    "load_params",
    "export_hf",
    "import_hf",
]

_META = "meta"
_EXTRAS = "extras"
_RESERVED = (_META, _EXTRAS)


class CheckpointMismatchError(ValueError):
    """A checkpoint does not match the run's model or state (shapes, dtypes, keys, model config)."""


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _path_str(path: tuple) -> str:
    return ".".join(_key_name(e) for e in path) or "."


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def flatten_tree(tree: Any) -> dict[str, Any]:
    """`{dotted path: leaf}` of a pytree (dict keys, attribute names and indices joined by dots)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    flat = {}
    for path, leaf in leaves:
        key = _path_str(path)
        if key in flat:
            raise ValueError(f"two leaves of the state flatten to the same checkpoint key {key!r}")
        flat[key] = leaf
    return flat


def unflatten_tree(like: Any, flat: Mapping[str, Any]) -> Any:
    """The pytree of the same structure as `like` with leaves taken from `flat` by dotted path."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[_path_str(p)] for p, _ in paths])


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint root written by `Checkpointer` (holds numbered step dirs)."""
    path = os.fspath(path)
    return os.path.isdir(path) and any(
        d.isdigit() and os.path.isdir(os.path.join(path, d, _META)) for d in os.listdir(path)
    )


def _describe(x: Any) -> str:
    return f"{tuple(x.shape)} {np.dtype(x.dtype).name if not _is_key(x) else x.dtype}"


class Checkpointer:
    """Save and restore a run's whole state under `directory` with orbax.

    Args:
      directory: the checkpoint root (created if needed).
      config: retention, async and best-metric settings (`CheckpointConfig`).
      model_config: the run's model config (any dataclass); saved with every checkpoint and
        compared on restore.
      read_only: open another run's checkpoints for reading (initial weights, export): nothing is
        created, written or cleaned up there (a save in progress elsewhere is left alone).

    Example:
      >>> ckpt = Checkpointer("runs/x/checkpoints", config=CheckpointConfig(keep=2))
      >>> ckpt.save(10, {"params": params, "train": (opt_state, step, rng)}, extras={"data": it.state})
      >>> state, extras = ckpt.restore({"params": abstract_params, "train": abstract_train})
    """

    def __init__(self, directory: str | os.PathLike, *, config: CheckpointConfig = CheckpointConfig(),
                 model_config: Any = None, read_only: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        self.config = config
        self.model_config = model_config
        self.read_only = read_only
        policies = [ocp_managers.LatestN(n=config.keep)]
        if config.keep_best:
            name = config.best_metric
            policies.append(ocp_managers.BestN(
                get_metric_fn=lambda metrics: float(metrics[name]),
                reverse=config.best_mode == "min",
                n=config.keep_best,
                keep_checkpoints_without_metrics=False,
            ))
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"no checkpoint directory {self.directory}")
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=config.async_save and not read_only,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        # Orbax removes the partial writes of an interrupted save in a background thread and only
        # waits for it at the next save; wait now, so an opened writable checkpointer never leaves one
        # on disk (e.g. a run that resumes, restores and exits before saving again).
        wait_for_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if wait_for_cleanup is not None:
            wait_for_cleanup()

    # ------------------------------------------------------------------------------------- queries

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def best_step(self, metric: str | None = None, mode: str | None = None) -> int | None:
        """The step whose saved metrics are best by `metric` (default: the config's best_metric)."""
        metric = metric or self.config.best_metric
        mode = mode or self.config.best_mode
        if metric is None and self.latest_step() is not None:
            meta = self._read_json_item(self.latest_step(), _META)
            metric, mode = meta.get("best_metric"), meta.get("best_mode", mode)
        if metric is None:
            return None
        scored = []
        for step in self.all_steps():
            metrics = self.metrics(step)
            if metrics and metric in metrics:
                scored.append((float(metrics[metric]), step))
        if not scored:
            return None
        return (max if mode == "max" else min)(scored)[1]

    def metrics(self, step: int) -> dict | None:
        """The metrics saved with checkpoint `step` (None when it was saved without)."""
        return self._read_json_item(int(step), _META).get("metrics")

    def item_shapes(self, name: str, step: int | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
        """`{dotted path: (shape, dtype name)}` of item `name` in checkpoint `step` (metadata only)."""
        step = self.latest_step() if step is None else int(step)
        item_dir = os.path.join(self.directory, str(step), name)
        if step is None or not os.path.isdir(item_dir):
            raise FileNotFoundError(f"no item {name!r} in checkpoint {step} of {self.directory}")
        tree = ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir)).tree
        return {k: (tuple(v.shape), np.dtype(v.dtype).name) for k, v in dict(tree).items()}

    # ---------------------------------------------------------------------------------------- save

    def save(self, step: int, state: Mapping[str, Any], *, extras: Mapping[str, Any] | None = None,
             metrics: Mapping[str, float] | None = None) -> bool:
        """Start writing checkpoint `step` (returns before the arrays are on disk when async).

        Args:
          step: the training step the state is at.
          state: named pytrees of arrays, e.g. `{"params": ..., "train": ...}`.
          extras: JSON-serializable host state (data iterator state, controller state, ...).
          metrics: eval metrics used to rank checkpoints when `keep_best` is set.
        Returns:
          False when checkpoint `step` already exists (nothing is written), True otherwise.
        """
        if self.read_only:
            raise RuntimeError(f"Checkpointer({self.directory}) was opened read-only")
        step = int(step)
        if step in self._manager.all_steps():
            return False
        for name in state:
            if name in _RESERVED:
                raise ValueError(f"state item name {name!r} is reserved for the checkpoint's own use")
        key_impls: dict[str, dict[str, str]] = {}
        items = {}
        for name, tree in state.items():
            flat = flatten_tree(tree)
            impls = {k: str(jax.random.key_impl(v)) for k, v in flat.items() if _is_key(v)}
            flat = {k: jax.random.key_data(v) if k in impls else v for k, v in flat.items()}
            key_impls[name] = impls
            items[name] = ocp.args.StandardSave(flat)
        meta = {
            "format": 1,
            "step": step,
            "model_config": None if self.model_config is None else to_dict(self.model_config),
            "key_impls": key_impls,
            "metrics": None if metrics is None else {k: float(v) for k, v in metrics.items()},
            "best_metric": self.config.best_metric,
            "best_mode": self.config.best_mode,
        }
        items[_META] = ocp.args.JsonSave(meta)
        items[_EXTRAS] = ocp.args.JsonSave(to_dict(dict(extras or {})))
        ranking = None
        if metrics is not None and self.config.best_metric and self.config.best_metric in metrics:
            ranking = {self.config.best_metric: float(metrics[self.config.best_metric])}
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), metrics=ranking))

    def wait(self) -> None:
        """Block until every pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- restore

    def _read_json_item(self, step: int, name: str) -> Any:
        restored = self._manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))
        return restored[name]

    def check_compatible(self, abstract_state: Mapping[str, Any], step: int | None = None) -> int:
        """Raise `CheckpointMismatchError` unless checkpoint `step` (default latest) fits the target.

        Compares the saved model config with this run's, then every array's shape and dtype with
        `abstract_state` (`jax.ShapeDtypeStruct` leaves), listing the differences. Reads metadata
        only. Returns the checked step.
        """
        step = self.latest_step() if step is None else int(step)
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in {self.directory}; "
                                    f"available steps: {self.all_steps()}")
        where = os.path.join(self.directory, str(step))
        meta = self._read_json_item(step, _META)
        problems = []
        saved_model = meta.get("model_config")
        if saved_model is not None and self.model_config is not None:
            ours = to_dict(self.model_config)
            for key in sorted(set(saved_model) | set(ours)):
                if saved_model.get(key) != ours.get(key) and key in _SHAPE_FIELDS:
                    problems.append(f"model.{key}: checkpoint {saved_model.get(key)!r}, this run {ours.get(key)!r}")
        for name, tree in abstract_state.items():
            item_dir = os.path.join(where, name)
            if not os.path.isdir(item_dir):
                problems.append(f"item {name!r}: missing from the checkpoint")
                continue
            saved = self.item_shapes(name, step)
            impls = meta.get("key_impls", {}).get(name, {})
            want = flatten_tree(tree)
            for key in sorted(set(saved) - set(want)):
                problems.append(f"{name}.{key}: in the checkpoint but not in this run's state")
            for key in sorted(set(want) - set(saved)):
                problems.append(f"{name}.{key}: missing from the checkpoint")
            for key in sorted(set(want) & set(saved)):
                target = want[key]
                if _is_key(target):
                    target_shape = tuple(jax.eval_shape(jax.random.key_data, target).shape)
                    if key not in impls or saved[key][0] != target_shape:
                        problems.append(f"{name}.{key}: checkpoint {saved[key][0]} key data, "
                                        f"this run a PRNG key {tuple(target.shape)} {target.dtype}")
                    continue
                (shape, dtype), t = saved[key], target
                if shape != tuple(t.shape) or dtype != np.dtype(t.dtype).name:
                    problems.append(f"{name}.{key}: checkpoint {shape} {dtype}, this run {_describe(t)}")
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise CheckpointMismatchError(
                f"checkpoint {where} does not match this run's model/state:\n  {shown}{more}\n"
                "Use another run directory, or point checkpoint.init_from at a checkpoint of this model."
            )
        return step

    def restore(self, abstract_state: Mapping[str, Any], *, step: int | None = None) -> tuple[dict[str, Any], dict]:
        """Restore the named pytrees of `abstract_state` (and the JSON extras) from checkpoint `step`.

        Args:
          abstract_state: `{name: pytree of jax.ShapeDtypeStruct}`; leaves with a `sharding` are
            restored directly onto it (no host round trip of the whole array). Only the named
            items are read, so `{"params": ...}` restores just the weights.
          step: the checkpoint to read (default: the latest).
        Returns:
          `(state, extras)`: the pytrees, shaped like `abstract_state`, and the JSON extras.
        Raises:
          CheckpointMismatchError: before reading any array, when shapes/dtypes/keys differ.
          FileNotFoundError: there is no such checkpoint.
        """
        step = self.check_compatible(abstract_state, step)
        meta = self._read_json_item(step, _META)
        args = {}
        for name, tree in abstract_state.items():
            impls = meta.get("key_impls", {}).get(name, {})
            flat = {k: _restore_target(v, k in impls) for k, v in flatten_tree(tree).items()}
            args[name] = ocp.args.StandardRestore(flat)
        args[_EXTRAS] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        state = {}
        for name, tree in abstract_state.items():
            impls = meta.get("key_impls", {}).get(name, {})
            flat = dict(restored[name])
            for key, impl in impls.items():
                flat[key] = jax.random.wrap_key_data(flat[key], impl=impl)
            state[name] = unflatten_tree(tree, flat)
        return state, dict(restored[_EXTRAS] or {})


# Model-config fields that change parameter shapes (others, e.g. dtypes of compute, may differ).
_SHAPE_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
    "head_dim", "tie_word_embeddings", "attention_bias", "qk_norm",
})


def _restore_target(leaf: Any, is_key: bool) -> jax.ShapeDtypeStruct:
    sharding = getattr(leaf, "sharding", None)
    if is_key:
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        if isinstance(sharding, jax.sharding.NamedSharding):
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding or _default_sharding())
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding or _default_sharding())


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def read_model_config(directory: str | os.PathLike, step: int | None = None) -> dict | None:
    """The model config dict saved with a checkpoint (latest step by default), or None."""
    with Checkpointer(directory, read_only=True) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {os.fspath(directory)}")
        return ckpt._read_json_item(step, _META).get("model_config")


def load_params(directory: str | os.PathLike, abstract_params: Any, *, model_config: Any = None,
                step: int | None = None, item: str = "params") -> Any:
    """Only the parameters of an rlhf-jax checkpoint (latest step by default), checked first.

    Args:
      directory: a checkpoint root (e.g. `runs/NAME/checkpoints`).
      abstract_params: the target pytree of `jax.ShapeDtypeStruct` (with shardings to place them).
      model_config: compared with the saved model config for a clearer error.
      step: which checkpoint (default: latest).
      item: the state item holding the parameters.
    """
    with Checkpointer(directory, model_config=model_config, read_only=True) as ckpt:
        state, _ = ckpt.restore({item: abstract_params}, step=step)
    return state[item]


# ------------------------------------------------------------------------------ Hugging Face interop


def _model_from_checkpoint(ckpt: Checkpointer, step: int, item: str):
    """(ModelConfig, head, abstract params) of the model whose weights are item `item` of `step`."""
    from rlhf_jax.config import from_dict  # noqa: PLC0415
    from rlhf_jax.models import CausalLM, ModelConfig  # noqa: PLC0415

    saved = ckpt._read_json_item(step, _META).get("model_config")
    if saved is None:
        raise CheckpointMismatchError(f"checkpoint {ckpt.directory}/{step} does not record its model config")
    config = from_dict(ModelConfig, saved)
    head = "scalar" if "score" in ckpt.item_shapes(item, step) else "lm"
    return config, head, CausalLM(config, head=head).abstract_params()


def export_hf(directory: str | os.PathLike, out_dir: str | os.PathLike, *, step: int | str | None = None,
              item: str = "params", tokenizer: Any = None, overwrite: bool = False) -> str:
    """Write the weights of an rlhf-jax checkpoint as a Hugging Face model directory.

    Args:
      directory: a checkpoint root (e.g. `runs/NAME/checkpoints`).
      out_dir: the Hugging Face directory to create (config.json + safetensors).
      step: a step number, "latest" / None, or "best" (by the best metric saved with checkpoints).
      item: the state item holding the parameters.
      tokenizer: an object with `save_pretrained` written beside the weights (optional).
      overwrite: replace an existing `out_dir`.
    Returns:
      `out_dir` as a string. A reward model (scalar head) is written as `*ForSequenceClassification`.
    """
    from rlhf_jax.models.hf import save_hf  # noqa: PLC0415

    with Checkpointer(directory, read_only=True) as ckpt:
        resolved = _resolve_step(ckpt, step)
        config, _, abstract = _model_from_checkpoint(ckpt, resolved, item)
        ckpt.model_config = config
        state, _ = ckpt.restore({item: abstract}, step=resolved)
    save_hf(out_dir, config, state[item], tokenizer, overwrite=overwrite)
    return os.fspath(out_dir)


def import_hf(hf_dir: str | os.PathLike, directory: str | os.PathLike, *, dtype: str | None = None,
              item: str = "params") -> int:
    """Write a Hugging Face model directory as an rlhf-jax checkpoint (step 0, params only).

    The result can be given to `checkpoint.init_from` or exported back with `export_hf`.
    Returns the step written (0).
    """
    from rlhf_jax.models.hf import load_hf  # noqa: PLC0415

    config, params = load_hf(hf_dir, dtype=dtype)
    with Checkpointer(directory, config=CheckpointConfig(async_save=False), model_config=config) as ckpt:
        if ckpt.all_steps():
            raise FileExistsError(f"{os.fspath(directory)} already holds checkpoints {ckpt.all_steps()}")
        ckpt.save(0, {item: params})
    return 0


def _resolve_step(ckpt: Checkpointer, step: int | str | None) -> int:
    if step in (None, "latest"):
        resolved = ckpt.latest_step()
    elif step == "best":
        resolved = ckpt.best_step()
        if resolved is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory} was saved with the best metric")
    else:
        resolved = int(step)
    if resolved is None or resolved not in ckpt.all_steps():
        raise FileNotFoundError(f"no checkpoint {step if step is not None else ''} in {ckpt.directory}; "
                                f"available steps: {ckpt.all_steps()}")
    return resolved
