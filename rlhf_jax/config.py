"""Experiment configuration: frozen, typed, keyword-only dataclasses per concern, composed into one.

An experiment's config is a tree of small frozen dataclasses (model, data, mesh, optim, algorithm,
sampling, train loop, checkpoint, logging). This module holds the sections that belong to runs
(`TrainConfig`, `CheckpointConfig`, `LoggingConfig`) and the generic machinery every section shares:

- `override(config, ["optim.learning_rate=3e-4", "algorithm.loss_type=ipo"])` parses each value by
  the field's type annotation, rebuilds the frozen tree with `dataclasses.replace` (so every
  section's `__post_init__` validation runs again), and raises `ConfigError` naming the key, the
  expected type, the closest key and the keys of that section when a key is unknown or a value
  does not parse. A float is finite unless its field allows otherwise (`ALLOW_NONFINITE`).
- `to_dict` / `from_dict` round-trip a config through JSON-compatible dicts (the `config.json` a
  run writes beside its checkpoints).
- `flat_keys(config)` lists every overridable dotted key with its type.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

import numpy as np

__all__ = [
    "ALLOW_NONFINITE",
    "ConfigError",
    "TrainConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "override",
    "parse_assignment",
    "flat_keys",
    "to_dict",
    "from_dict",
    "check_choice",
]

# The training step's NaN/Inf guard (the one definition; `rlhf_jax.steps.common` re-exports it).
NonFinitePolicy = Literal["skip", "halt", "off"]


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key and what was expected."""


# Field metadata of a float field that may be set to inf or nan from the command line or a dict,
# e.g. `clip: float = dataclasses.field(default=math.inf, metadata=ALLOW_NONFINITE)`. Without it,
# `--set key=inf` (or nan, or 1e999) is refused at parse time.
ALLOW_NONFINITE = types.MappingProxyType({"allow_nonfinite": True})


def check_choice(owner: str, name: str, value: Any, literal: Any) -> None:
    """Raise ConfigError naming `owner.name` when `value` is not one of the `Literal`'s choices."""
    allowed = get_args(literal)
    if value not in allowed:
        raise ConfigError(f"{owner}.{name} must be one of {allowed}, got {value!r}")


def _check_positive_int(owner: str, name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{owner}.{name} must be a positive int, got {value!r}")


def check_unused(owner: str, config: Any, name: str, *, used: bool, needs: str) -> None:
    """Raise ConfigError naming `owner.name` when the field holds a value other than its default while
    `used` is false: a setting of another mode, which the run would silently ignore. `needs` says
    what makes it count (a value equal to the default changes nothing, so it passes)."""
    value, default = getattr(config, name), _fields(config)[name].default
    if not used and value != default:
        raise ConfigError(f"{owner}.{name}={value!r} has no effect unless {needs}: set that, or leave "
                          f"{owner}.{name} at its default ({default!r})")


def _check_bools(owner: str, config: Any) -> None:
    """Raise ConfigError naming `owner.name` for a `bool` field of `config` that holds anything but
    True or False: a Python value such as "false" or 2 would read as true."""
    for name, tp in _hints(type(config)).items():
        value = getattr(config, name)
        if tp is bool and not isinstance(value, (bool, np.bool_)):
            raise ConfigError(f"{owner}.{name} must be true or false, got {value!r}")


# --------------------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training loop: how long, how often to evaluate, what to do with a non-finite update.

    Attributes:
      steps: optimizer updates in the whole run (a resumed run continues up to this number).
      eval_every: run the evaluation every this many steps; it also runs after the last step and,
        on a fresh run of a driver that measures a baseline, before the first (step 0); 0 = only
        those.
      eval_batches: held-out batches per evaluation.
      micro_batches: gradient-accumulation micro-batches per step (the batch is split evenly).
      nonfinite: the step's NaN/Inf guard: "skip" drops the update and continues, "halt" stops the
        run with a message naming the step, "off" applies every update unguarded.
    """

    steps: int = 100
    eval_every: int = 0
    eval_batches: int = 4
    micro_batches: int = 1
    nonfinite: NonFinitePolicy = "skip"

    def __post_init__(self):
        _check_positive_int("train", "steps", self.steps)
        _check_positive_int("train", "eval_batches", self.eval_batches)
        _check_positive_int("train", "micro_batches", self.micro_batches)
        if not isinstance(self.eval_every, int) or isinstance(self.eval_every, bool) or self.eval_every < 0:
            raise ConfigError(f"train.eval_every must be an int >= 0, got {self.eval_every!r}")
        check_choice("train", "nonfinite", self.nonfinite, NonFinitePolicy)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Where checkpoints go, how often, how many to keep, and what to initialize from.

    Attributes:
      every: save every this many steps (and always at the end and on SIGTERM/SIGINT); 0 = only then.
      keep: keep the latest this many checkpoints.
      keep_best: additionally keep this many best checkpoints by `best_metric` (0 = none).
      best_metric: an eval metric name, e.g. "eval/rewards/accuracies".
      best_mode: "max" or "min" for `best_metric`.
      async_save: write checkpoints in a background thread while training continues.
      init_from: initial weights: a Hugging Face model directory or an rlhf-jax checkpoint
        directory (a run's `checkpoints/`); None = random init. Ignored when the run resumes from
        its own checkpoints.
      resume: resume from the latest checkpoint in the run's directory when there is one.
      on_corrupt: a checkpoint whose files differ from its integrity manifest: "fallback" uses the
        newest intact one with a warning (the corrupt step is moved aside to `<step>.corrupt`),
        "raise" stops with one line naming the step directory and the bad file.
    """

    every: int = 0
    keep: int = 2
    keep_best: int = 0
    best_metric: str | None = None
    best_mode: Literal["max", "min"] = "max"
    async_save: bool = True
    init_from: str | None = None
    resume: bool = True
    on_corrupt: Literal["fallback", "raise"] = "fallback"

    def __post_init__(self):
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 0:
            raise ConfigError(f"checkpoint.every must be an int >= 0, got {self.every!r}")
        _check_positive_int("checkpoint", "keep", self.keep)
        if not isinstance(self.keep_best, int) or isinstance(self.keep_best, bool) or self.keep_best < 0:
            raise ConfigError(f"checkpoint.keep_best must be an int >= 0, got {self.keep_best!r}")
        if self.keep_best and not self.best_metric:
            raise ConfigError("checkpoint.keep_best > 0 needs checkpoint.best_metric (an eval metric name)")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            # e.g. `--set checkpoint.init_from=$SFT_DIR` with the variable unset: not a random init
            raise ConfigError(f"checkpoint.init_from must be a path or None (random init), got {self.init_from!r}")
        check_choice("checkpoint", "best_mode", self.best_mode, Literal["max", "min"])
        check_choice("checkpoint", "on_corrupt", self.on_corrupt, Literal["fallback", "raise"])
        _check_bools("checkpoint", self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """Where metrics go: console progress bar, JSONL, TensorBoard, optionally Weights & Biases.

    Attributes:
      every: fetch metrics from the device and log them every this many steps (the step itself
        never waits on the host in between).
      console: show a progress bar (step/s, ETA, key metrics) on stderr (eval results and
        warnings are printed there either way).
      jsonl: write `metrics.jsonl` in the run directory.
      tensorboard: write TensorBoard event files under `tb/` in the run directory.
      wandb: log to Weights & Biases (needs `pip install wandb`); `wandb_project` names the project.
    """

    every: int = 1
    console: bool = True
    jsonl: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "rlhf_jax"

    def __post_init__(self):
        _check_positive_int("logging", "every", self.every)
        _check_bools("logging", self)


# ------------------------------------------------------------------------------ type-driven parsing


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(obj_or_cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj_or_cls) if f.init}


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{_type_name(args[0])}, ...]"
        return f"tuple[{', '.join(_type_name(a) for a in args)}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


class _NonFinite(ValueError):
    """A float field was given inf or nan (not retried as another member of a union)."""


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


def _parse(text: str, tp: Any, *, allow_nonfinite: bool = False) -> Any:
    """Parse `text` as a value of type `tp`; raise ValueError when it does not fit.

    Floats must be finite (no inf, nan or overflow to inf) unless `allow_nonfinite`.
    """
    origin = get_origin(tp)
    if tp is Any:
        return text
    if origin is Literal:
        for choice in get_args(tp):
            if str(choice) == text:
                return choice
        raise ValueError(f"expected one of {get_args(tp)}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and text.strip().lower() in _NONE:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse(text, arg, allow_nonfinite=allow_nonfinite)
            except _NonFinite:
                raise
            except ValueError:
                continue
        raise ValueError(f"expected {_type_name(tp)}")
    if origin is tuple:
        args = get_args(tp)
        body = text.strip().strip("()[]").strip()
        parts = [p.strip() for p in body.split(",")] if body else []
        if parts and not parts[-1]:  # one trailing comma, as in "(8,)"
            parts.pop()
        if "" in parts:
            raise ValueError("an empty entry between commas")
        # a quoted entry, as in the list `--print-config` shows (["a", "b"]), is the text inside the quotes
        parts = [p[1:-1] if len(p) >= 2 and p[0] == p[-1] and p[0] in "'\"" else p for p in parts]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse(p, args[0], allow_nonfinite=allow_nonfinite) for p in parts)
        if len(parts) != len(args):
            raise ValueError(f"expected {len(args)} comma-separated values")
        return tuple(_parse(p, a, allow_nonfinite=allow_nonfinite) for p, a in zip(parts, args))
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("expected a bool (true/false)")
    if tp is int:
        try:
            return int(text.strip().replace("_", ""))
        except ValueError:
            raise ValueError("expected an int") from None
    if tp is float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError("expected a float") from None
        if not allow_nonfinite and not math.isfinite(value):
            raise _NonFinite(f"must be a finite number, got {text.strip()!r}")
        return value
    if tp is str:
        return text
    if dataclasses.is_dataclass(tp):
        raise ValueError(f"{_type_name(tp)} is a section: set its fields with a longer key")
    raise ValueError(f"cannot parse a value of type {_type_name(tp)} from the command line")


def _check_value(value: Any, tp: Any) -> bool:
    """Whether an already-typed Python value fits `tp` (used for dict round trips)."""
    origin = get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_check_value(value, a) for a in get_args(tp))
    if tp is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, tuple)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


# ----------------------------------------------------------------------------------- key listing


def flat_keys(config: Any, prefix: str = "", *, nested: bool = True) -> dict[str, str]:
    """Every overridable dotted key of `config` mapped to the name of its type.

    Sections (nested dataclass values) are walked into, their own keys not listed; with
    `nested=False` a section is listed as one `name.*` entry instead.
    """
    out: dict[str, str] = {}
    hints = _hints(type(config))
    for name in _fields(config):
        value, key = getattr(config, name), f"{prefix}{name}"
        if not _is_section(value):
            out[key] = _type_name(hints[name])
        elif nested:
            out.update(flat_keys(value, key + "."))
        else:
            out[key + ".*"] = f"section ({type(value).__name__})"
    return out


def _valid_keys_message(config: Any, key: str, section: Any, prefix: str) -> str:
    """The closest keys of the whole config, then the keys of the section where `key` went wrong."""
    # With the keys of `section` too: an optional section left None (`lora`) has none in `config`'s.
    every = list({**flat_keys(config), **flat_keys(section, prefix)})
    last = key.rsplit(".", 1)[-1]
    close = [k for k in every if k.rsplit(".", 1)[-1] == last]   # the right name in another section
    close = close or difflib.get_close_matches(key, every, n=1, cutoff=0.75)
    hint = f" Did you mean {' or '.join(close[:3])}?" if close else ""
    where = f"section {prefix[:-1]!r}" if prefix else "the top level"
    listed = "\n".join(f"  {k}: {t}" for k, t in flat_keys(section, prefix, nested=False).items())
    return f"{hint}\nKeys of {where}:\n{listed}"


# ---------------------------------------------------------------------------------------- override


def parse_assignment(assignment: str) -> tuple[str, str]:
    """Split `"a.b=value"` into `("a.b", "value")`; raise ConfigError when there is no `=`."""
    key, sep, value = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. optim.learning_rate=1e-4")
    return key, value


def _unset_section(parent: Any, name: str, value: Any) -> Any:
    """The default instance of an optional section left None (`lora: LoraConfig | None = None`), so
    that setting one of its keys turns it on; otherwise `value` unchanged."""
    if value is not None or parent is None:
        return value
    args = get_args(_hints(type(parent))[name])
    sections = [a for a in args if dataclasses.is_dataclass(a)]
    if type(None) in args and len(sections) == 1:
        try:
            return sections[0]()
        except TypeError:  # a section without defaults for every field stays unset
            return value
    return value


def _field_type(config: Any, parts: list[str], *, key: str, assignment: str) -> tuple[Any, Any, dataclasses.Field]:
    """(annotated type, current value, field) at `parts`; ConfigError for an unknown key. An optional
    section left None is entered as its default instance (`--set lora.rank=16` turns LoRA on)."""
    node, parent = config, None
    for i, name in enumerate(parts):
        if i > 0:
            node = _unset_section(parent, parts[i - 1], node)
        if not _is_section(node):
            grand = ".".join(parts[: i - 1])
            raise ConfigError(
                f"--set {assignment}: {'.'.join(parts[:i])!r} is a value of type "
                f"{_type_name(_hints(type(parent))[parts[i - 1]])}, not a section; unknown key {key!r}."
                f"{_valid_keys_message(config, key, parent, grand + '.' if grand else '')}"
            )
        if name not in _fields(node):
            prefix = ".".join(parts[:i])
            message = _valid_keys_message(config, key, node, prefix + "." if prefix else "")
            raise ConfigError(f"--set {assignment}: unknown key {key!r}.{message}")
        parent, node = node, getattr(node, name)
    return _hints(type(parent))[parts[-1]], node, _fields(parent)[parts[-1]]


def _is_section(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _apply(node: Any, changes: dict[tuple[str, ...], tuple[Any, str]]) -> Any:
    """Rebuild `node` with `changes` (relative paths -> (value, assignment)), one replace per section."""
    updates: dict[str, Any] = {}
    nested: dict[str, dict[tuple[str, ...], tuple[Any, str]]] = {}
    for path, change in changes.items():
        if len(path) == 1:
            updates[path[0]] = change[0]
        else:
            nested.setdefault(path[0], {})[path[1:]] = change
    for name, sub in nested.items():
        updates[name] = _apply(_unset_section(node, name, getattr(node, name)), sub)
    try:
        return dataclasses.replace(node, **updates)
    except (ValueError, TypeError) as e:
        involved = ", ".join(a for _, a in changes.values())
        raise ConfigError(f"--set {involved}: {e}") from None


def override(config: Any, assignments: list[str] | tuple[str, ...]) -> Any:
    """Apply `KEY=VALUE` overrides (dotted keys) to a frozen dataclass config tree, all at once.

    Each value is parsed by the annotated type of its field (bool, int, float, str, `Literal`,
    `X | None` with "none", `tuple[int, ...]` as "1,2,3", "(1, 2)" or "[1, 2]", an entry in quotes being
    the text inside them, "" or "()" the empty tuple). All values are applied before any
    section is validated, so fields checked together (e.g. `data.max_len` and
    `data.max_prompt_len`) can change together: each changed section is rebuilt once with
    `dataclasses.replace` and its `__post_init__` checks the final values. A key set twice takes its
    last value.

    Args:
      config: the root config (a frozen dataclass instance).
      assignments: strings like `"optim.learning_rate=3e-4"`.
    Returns:
      A new config; `config` is unchanged.
    Raises:
      ConfigError: unknown key (the message suggests the closest keys and lists the keys of the
        section concerned), a value of the wrong type, a non-finite float (unless the field's
        metadata is `ALLOW_NONFINITE`), a value rejected by a section's validation, or a key inside
        a section that is also set whole.
    """
    changes: dict[tuple[str, ...], tuple[Any, str]] = {}
    for assignment in assignments:
        key, text = parse_assignment(assignment)
        parts = key.split(".")
        tp, current, field = _field_type(config, parts, key=key, assignment=assignment)
        if _is_section(current) and text.strip().lower() not in _NONE:
            raise ConfigError(f"--set {assignment}: {key!r} is a section; set one of its keys: "
                              + ", ".join(flat_keys(current, key + ".")))
        try:
            value = _parse(text, tp, allow_nonfinite=field.metadata.get("allow_nonfinite", False))
        except _NonFinite as e:
            raise ConfigError(f"--set {assignment}: {key} {e}") from None
        except ValueError as e:
            raise ConfigError(
                f"--set {assignment}: wrong type for {key!r}: {e}; the key has type {_type_name(tp)}, got {text!r}"
            ) from None
        changes[tuple(parts)] = (value, assignment)
    paths = sorted(changes)
    for a, b in zip(paths, paths[1:]):
        if b[: len(a)] == a:
            raise ConfigError(f"--set {changes[a][1]} and --set {changes[b][1]}: the second sets a key inside "
                              "the section the first replaces")
    return _apply(config, changes) if changes else config


# ----------------------------------------------------------------------------------- dict round trip


def to_dict(config: Any) -> Any:
    """JSON-compatible values of a dataclass config or host state.

    Dataclasses become dicts of their init fields, tuples lists, and NumPy / JAX arrays and
    scalars (e.g. in a data iterator's state) Python numbers or nested lists.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}
    if isinstance(config, (tuple, list)):
        return [to_dict(v) for v in config]
    if isinstance(config, Mapping):
        return {str(k): to_dict(v) for k, v in config.items()}
    if hasattr(config, "__array__") and not isinstance(config, (str, bytes)):
        return np.asarray(config).tolist()
    return config


def _from_value(value: Any, tp: Any, key: str, allow_nonfinite: bool = False) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(get_args(tp)):
            return None
        if isinstance(value, dict):
            # `to_dict` writes every init field, so the member whose fields are exactly the dict's keys
            # is the one written (`ORPO(beta=...)` is not read back as `DPO`, whose other fields have
            # defaults); a partial dict goes to the first member that accepts it.
            sections = [a for a in args if dataclasses.is_dataclass(a)]
            sections.sort(key=lambda a: set(_fields(a)) != set(value))
            errors = []
            for arg in sections:
                try:
                    return from_dict(arg, value, prefix=key + ".")
                except ConfigError as e:
                    errors.append(str(e))
            raise ConfigError(f"{key}: no section type of {_type_name(tp)} accepts {value!r}: {errors}")
        for arg in args:
            if _check_value(value, arg) or (get_origin(arg) is tuple and isinstance(value, list)):
                return _from_value(value, arg, key, allow_nonfinite)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a {tp.__name__} section (a dict), got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list for {_type_name(tp)}, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_value(v, args[0], key, allow_nonfinite) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values for {_type_name(tp)}, got {value!r}")
        return tuple(_from_value(v, a, key, allow_nonfinite) for v, a in zip(value, args))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not allow_nonfinite and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if not _check_value(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: dict, *, prefix: str = "") -> Any:
    """Rebuild a dataclass of type `cls` from `to_dict` output, checking keys and types.

    Nested sections are rebuilt by their annotated dataclass type; a union of sections is resolved
    by the first member whose fields accept the dict.
    """
    fields = _fields(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix or cls.__name__ + ': '}unknown keys {unknown}; valid: {sorted(fields)}")
    hints = _hints(cls)
    kwargs = {name: _from_value(value, hints[name], f"{prefix}{name}", fields[name].metadata.get("allow_nonfinite"))
              for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
