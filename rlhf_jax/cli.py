"""The `rlhf-jax` command line: run experiments, compile ahead of time, convert and export checkpoints.

    rlhf-jax run experiments/NAME.py[:ARG] [--set KEY=VALUE ...] [--print-config]
    rlhf-jax compile experiments/NAME.py[:ARG] [--set KEY=VALUE ...] [--topology v5e:4x4] [--json FILE]
    rlhf-jax compile --model PRESET --step dpo --strategy fsdp --mesh fsdp=8 ...   (rlhf_jax.compile)
    rlhf-jax convert SRC DST [--dtype float32|bfloat16] [--step N|latest|best]
    rlhf-jax export RUN_DIR OUT_DIR [--step N|latest|best] [--overwrite] [--merge] [--max-shard-size 2GB]

An experiment is a Python file with `get_config(arg=None)` returning a frozen config and
`main(config)` running it (big_vision style; `:ARG` is passed to `get_config`, e.g. `:tiny`).
`--set` overrides any config key with a value parsed by the key's type; a bad key or value is
reported (with the closest key and the keys of its section) before anything is computed.

Exit status: 0 when the command finished; `EXIT_PREEMPTED` = 75 (EX_TEMPFAIL) when `run` was stopped
by SIGTERM/SIGINT (during training after saving a checkpoint; during setup, compilation or between
stages at once, with nothing new to save), so a scheduler reruns the same command to resume; 2 for
a user error (one `error:` line); 1 when the NaN/Inf guard halted the run, or when an experiment that
makes acceptance checks (the quickstart's margins) finished without meeting them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from rlhf_jax import distributed as _dist

__all__ = ["main", "load_experiment", "experiment_config", "setup_process", "EXIT_PREEMPTED"]

_DESCRIPTION = "rlhf_jax: JAX-native post-training (SFT, reward models, DPO, PPO, GRPO) of language models."
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: `run` stopped by SIGTERM/SIGINT after saving; rerun the command to resume


class CLIError(Exception):
    """A user error the CLI reports in one line (exit status 2), without a traceback."""


def load_experiment(spec: str) -> tuple[ModuleType, str | None]:
    """Import `path/to/NAME.py[:ARG]` as a module; return it and ARG (None when absent).

    Raises:
      CLIError: the file does not exist, is not a .py file, or lacks `get_config` / `main`.
    """
    path, sep, arg = spec.partition(":")
    if not path.endswith(".py"):
        raise CLIError(f"experiment {spec!r}: expected a path to a .py file, e.g. experiments/sft_tiny.py")
    if not os.path.isfile(path):
        raise CLIError(f"experiment file not found: {path}")
    name = "rlhf_jax_experiment_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    for attr in ("get_config", "main"):
        if not callable(getattr(module, attr, None)):
            raise CLIError(f"experiment {path} must define {attr}(...)")
    return module, (arg if sep else None)


def experiment_config(module: ModuleType, arg: str | None, assignments: Sequence[str]) -> Any:
    """`module.get_config(arg)` (or `get_config()` without ARG) with `--set` overrides applied."""
    from rlhf_jax.config import override  # noqa: PLC0415

    if arg is None:
        config = module.get_config()
    else:
        try:
            config = module.get_config(arg)
        except ValueError as e:  # the experiments' "unknown mode" error
            raise CLIError(f"experiment {module.__file__}:{arg}: {e}") from e
    return override(config, list(assignments))


# ------------------------------------------------------------------------------------------ commands


def _cmd_run(args: argparse.Namespace) -> int:
    from rlhf_jax.config import to_dict  # noqa: PLC0415

    several = _join(args)
    from rlhf_jax.train.loop import Interrupted, interrupt_outside_training  # noqa: PLC0415 (after _join)

    module, arg = load_experiment(args.experiment)
    config = experiment_config(module, arg, args.set)
    if several:  # every process runs the same config, experiment and code, or none runs
        _dist.agree({**_dist.run_record(to_dict(config), module.__file__), "print-config": args.print_config,
                     "experiment arg": arg})
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2))
        return 0
    try:
        with contextlib.nullcontext() if several else interrupt_outside_training():
            result = module.main(config)
    except Interrupted as e:
        print(f"rlhf-jax run: {e.signal_name} outside a training loop (setup, compilation or between stages): "
              "nothing new to save; exiting (rerun the command to continue)", file=sys.stderr)
        return EXIT_PREEMPTED
    if isinstance(result, dict) and result:
        print(json.dumps(result, indent=2, default=str))
    if isinstance(result, dict) and result.get("stopped_by"):  # the drivers' (and stages') summary
        return EXIT_PREEMPTED
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    rest = list(args.rest)
    if not rest or not rest[0].partition(":")[0].endswith(".py"):
        raise CLIError("compile: give an experiment (experiments/NAME.py) or model-preset options (--model ...)")
    from rlhf_jax.targets import TargetError, gpu_device_count, memory_gib, parse_target_name  # noqa: PLC0415 (no JAX)

    parser = argparse.ArgumentParser(prog="rlhf-jax compile EXPERIMENT")
    _add_experiment_args(parser)
    parser.add_argument("--topology", default=None,
                        help="TPU topology (v5e:2x4), accelerator type (v5litepod-16, v5p-64) or GPUs (h100-8)")
    parser.add_argument("--device-memory-gib", type=memory_gib, default=None,
                        help="memory per device for the fit check (GiB)")
    parser.add_argument("--suggest", type=int, default=3, help="knobs to try by compiling when a run does not fit")
    parser.add_argument("--json", default=None)
    opts = parser.parse_args(rest)
    if opts.suggest < 0:  # a negative count would slice the knob list from its end
        raise CLIError(f"compile: --suggest is a number of knobs to try (>= 0), got {opts.suggest}")
    try:
        if opts.topology is not None:
            parse_target_name(opts.topology)  # a bad name fails before anything heavy is imported
        _join(opts)
        from rlhf_jax.train.aot import compile_command  # noqa: PLC0415

        gpus = gpu_device_count(opts.topology)  # a GPU plan compiles for as many local devices (before JAX starts)
        if gpus:
            import jax  # noqa: PLC0415
            from jax._src import xla_bridge  # noqa: PLC0415

            if not xla_bridge.backends_are_initialized() and jax.config.jax_num_cpu_devices < gpus:
                jax.config.update("jax_num_cpu_devices", gpus)
        return compile_command(opts.experiment, sets=opts.set, topology=opts.topology,
                               device_memory_gib=opts.device_memory_gib, json_path=opts.json, suggestions=opts.suggest)
    except TargetError as e:
        raise CLIError(str(e)) from e


def _cmd_convert(args: argparse.Namespace) -> int:
    from rlhf_jax.checkpoint import is_checkpoint_dir  # noqa: PLC0415
    from rlhf_jax.checkpoint_hf import export_hf, import_hf  # noqa: PLC0415

    src = args.src
    if not os.path.isdir(src):
        raise CLIError(f"convert: source directory not found: {src}")
    if os.path.isfile(os.path.join(src, "config.json")) and not is_checkpoint_dir(src):
        import_hf(src, args.dst, dtype=args.dtype)
        print(f"wrote rlhf-jax checkpoint {args.dst} (step 0) from Hugging Face directory {src}")
    elif is_checkpoint_dir(src):
        if os.path.exists(args.dst) and not args.overwrite:
            raise CLIError(f"convert: {args.dst} exists; pass --overwrite to replace it")
        exported = export_hf(src, args.dst, step=args.step, overwrite=args.overwrite)
        print(f"wrote Hugging Face directory {args.dst} from checkpoint {src} (step {exported.step})")
    else:
        raise CLIError(f"convert: {src} is neither a Hugging Face model directory (config.json) nor an "
                       "rlhf-jax checkpoint directory (numbered step directories)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from rlhf_jax.checkpoint import is_checkpoint_dir  # noqa: PLC0415
    from rlhf_jax.checkpoint_hf import export_hf  # noqa: PLC0415

    run_dir = args.run_dir
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not is_checkpoint_dir(ckpt_dir):
        raise CLIError(f"export: no checkpoints in {ckpt_dir} (is {run_dir} a run directory?)")
    if os.path.exists(args.out_dir) and not args.overwrite:
        raise CLIError(f"export: {args.out_dir} exists; pass --overwrite to replace it")
    # export_hf's default tokenizer is the run's (RUN_DIR/tokenizer): the same export as from Python.
    exported = export_hf(ckpt_dir, args.out_dir, step=args.step, overwrite=args.overwrite, merge=args.merge,
                         max_shard_size=args.max_shard_size)
    lora = os.path.isdir(os.path.join(ckpt_dir, str(exported.step), "lora"))
    what = "" if not lora else " (LoRA adapters merged)" if args.merge else " as PEFT adapters (--merge: one model)"
    with_tokenizer = os.path.isfile(os.path.join(args.out_dir, "tokenizer_config.json"))
    print(f"exported {ckpt_dir} (step {exported.step}) to {args.out_dir}{what}"
          + (" with its tokenizer" if with_tokenizer else ""))
    return 0


# ------------------------------------------------------------------------------------------- parser


def _add_experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="path to an experiment module, optionally with :ARG for get_config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.learning_rate=1e-4 (repeatable)")
    multi = p.add_argument_group("multi-process (rlhf_jax.distributed; automatic on TPU pods)")
    multi.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help=f"process 0's coordination address (or ${{{_dist.ENV_COORDINATOR}}})")
    multi.add_argument("--num-processes", type=int, default=None, help=f"processes (or ${{{_dist.ENV_NUM_PROCESSES}}})")
    multi.add_argument("--process-id", type=int, default=None, help=f"this process (or ${{{_dist.ENV_PROCESS_ID}}})")
    multi.add_argument("--init-timeout", type=int, default=None, metavar="S",
                       help=f"seconds to wait for every process to join (default {_dist.INIT_TIMEOUT_S}; "
                            f"{_dist.LOCAL_INIT_TIMEOUT_S} with a loopback --coordinator)")
    multi.add_argument("--heartbeat-timeout", type=int, default=100, metavar="S",
                       help="seconds without a heartbeat after which a process is declared dead (default 100)")


def _checkpoint_step(text: str) -> int | str:
    """`--step`: a step number, "latest" or "best" (argparse reports anything else, exit status 2)."""
    if text in ("latest", "best"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, 'latest' or 'best', got {text!r}") from None


def _shard_size(text: str) -> str:
    """`--max-shard-size`: bytes or a size like 2GB / 500MiB (argparse reports anything else, exit status 2)."""
    from rlhf_jax.models.hf import parse_size  # noqa: PLC0415

    try:
        parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("save_hf: ")) from None
    return text


def _join(args: argparse.Namespace) -> bool:
    """Start `jax.distributed` when the flags, the environment or the cluster say so (before any JAX
    work); whether it started."""
    return _dist.initialize(_dist.from_env(args.coordinator, args.num_processes, args.process_id,
                                    timeout_s=args.init_timeout, heartbeat_s=args.heartbeat_timeout))


def build_parser() -> argparse.ArgumentParser:
    """The `rlhf-jax` argument parser with its four sub-commands."""
    parser = argparse.ArgumentParser(prog="rlhf-jax", description=_DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run an experiment module",
                         description="Run experiments/NAME.py: get_config(ARG), apply --set overrides, main(config). "
                                     "Re-running the same command resumes from the run's latest checkpoint.")
    _add_experiment_args(run)
    run.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    run.set_defaults(func=_cmd_run)

    comp = sub.add_parser(
        "compile", help="ahead-of-time compile a training step and report memory, FLOPs and fit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Lower and compile a training step without running it, for this machine's devices or a TPU "
                    "topology, and report per-device memory, FLOPs and whether it fits (exit 3 if not, 2 on "
                    "bad input).\n\n"
                    "  rlhf-jax compile experiments/NAME.py[:ARG] [--set KEY=VALUE ...] [--topology v5e:4x4]\n"
                    "      [--device-memory-gib G] [--json FILE]      the experiment's own step(s)\n"
                    "  rlhf-jax compile --model PRESET --step sft|reward_model|dpo --strategy S --mesh fsdp=8 ...\n"
                    "      a model preset; `rlhf-jax compile --model w1 --help` lists these options")
    comp.add_argument("rest", nargs=argparse.REMAINDER, help="an experiment and its options, or model-preset options")
    comp.set_defaults(func=_cmd_compile)

    conv = sub.add_parser("convert", help="convert between a Hugging Face directory and an rlhf-jax checkpoint",
                          description="SRC a Hugging Face model directory -> DST an rlhf-jax checkpoint (step 0); "
                                      "SRC an rlhf-jax checkpoint directory -> DST a Hugging Face directory.")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="parameter dtype when importing from Hugging Face (default: the checkpoint's)")
    conv.add_argument("--step", type=_checkpoint_step, default="latest",
                      help="checkpoint step to export: N, latest or best")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing Hugging Face DST")
    conv.set_defaults(func=_cmd_convert)

    exp = sub.add_parser("export", help="export a run's trained policy as a Hugging Face directory",
                         description="Write RUN_DIR/checkpoints (step N, latest or best) and the run's tokenizer "
                                     "as a Hugging Face model directory.")
    exp.add_argument("run_dir")
    exp.add_argument("out_dir")
    exp.add_argument("--step", type=_checkpoint_step, default="latest",
                     help="N, latest or best (by the run's best metric)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    exp.add_argument("--merge", action="store_true",
                     help="a LoRA run: write the merged model (W + s·A·B) instead of its PEFT adapters")
    exp.add_argument("--max-shard-size", type=_shard_size, default="2GB",
                     help="largest safetensors file, e.g. 2GB or 500MiB; bigger models are written as shards "
                          "with model.safetensors.index.json (default: 2GB)")
    exp.set_defaults(func=_cmd_export)
    return parser


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of `prefixes` (known, harmless notices)."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


# Notices of our dependencies that a normal run triggers and that tell the user nothing actionable:
# transformers' advice when torch is absent (we never use torch), and orbax's remarks on opening a
# checkpoint read-only (which we do on purpose for `init_from` and `export`).
_QUIET = {
    "transformers": ("PyTorch was not found",),
    "absl": ("CheckpointManagerOptions.read_only=True", "Given directory is read only"),
}


def setup_process() -> str:
    """The process-wide settings of a `rlhf-jax` command, made before anything runs JAX.

    Importing `rlhf_jax` changes none of these; an entry point calls this first:
    - the host allocator (`rlhf_jax.host_memory.configure_from_env`, `RLHF_JAX_HOST_MEMORY`);
    - absl (orbax's logger) at WARNING, and the notices in `_QUIET` dropped by a filter on the
      `transformers` and `absl` loggers (only those messages; every other warning still shows).

    Returns:
      The host-memory decision (`rlhf_jax.host_memory.status()`).
    Raises:
      ValueError: `RLHF_JAX_HOST_MEMORY` has a value other than auto, keep or system.
    """
    from rlhf_jax import host_memory  # noqa: PLC0415

    decision = host_memory.configure_from_env()
    logging.getLogger("absl").setLevel(logging.WARNING)
    for name, prefixes in _QUIET.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
    return decision


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `rlhf-jax` and `python -m rlhf_jax`; returns the exit status.

    User errors (bad config keys or values, missing files, mismatched checkpoints, bad data) print
    one `error:` line and return 2; a run halted by the NaN/Inf guard prints the step and returns
    1, and so do an experiment's missed acceptance checks (`train.results.ChecksMissed`, naming them)
    and an `OSError` (the disk is full, a write failed) with one `error:` line; anything
    else raises with its traceback. `setup_process()` runs first.
    """
    try:
        setup_process()
    except ValueError as e:
        print(f"rlhf-jax: error: {e}", file=sys.stderr)
        return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compile"] and len(argv) > 1 and argv[1].startswith("-") and argv[1:] != ["--help"] \
            and argv[1:] != ["-h"]:
        from rlhf_jax.compile import main as compile_main  # noqa: PLC0415 (the model-preset form)

        return compile_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, FileNotFoundError, FileExistsError, _dist.DistributedError) as e:  # nothing more to import
        print(f"rlhf-jax {args.command}{_process_label()}: error: {e}", file=sys.stderr)
        return _leave(2)
    except _user_errors() as e:  # evaluated only when something else was raised
        print(f"rlhf-jax {args.command}{_process_label()}: error: {e}", file=sys.stderr)
        return _leave(2)
    except _training_halted() as e:
        print(f"rlhf-jax {args.command}{_process_label()}: {e}", file=sys.stderr)
        return _leave(1)
    except OSError as e:  # the machine's side (a full disk, a file size limit, a lost mount); names the file
        print(f"rlhf-jax {args.command}{_process_label()}: error: {e}", file=sys.stderr)
        return _leave(1)
    except Exception:
        label = _process_label()
        if not label:
            raise
        # A multi-process run: name the process, print the traceback and leave at once. A normal exit
        # would wait in jax.distributed's shutdown barrier for the others, which wait in a collective
        # for this one; instead they lose its heartbeat (--heartbeat-timeout) and end too.
        import traceback  # noqa: PLC0415

        print(f"rlhf-jax {args.command}{label}: failed:", file=sys.stderr)
        traceback.print_exc()
        if _lost_a_peer(sys.exc_info()[1]):
            print(f"rlhf-jax {args.command}{label}: another process of this run ended first (a collective lost "
                  "its peer): that process's own output names the cause", file=sys.stderr)
        return _leave(1)


# What JAX's multi-process runtime says when a peer process is gone (gloo's TCP pairs, the
# coordination service's heartbeats).
_LOST_PEER = ("connection closed by peer", "connection reset by peer", "gloo", "heartbeat",
              "coordination service")


def _lost_a_peer(error: BaseException) -> bool:
    """Whether `error` (or an exception it came from) is a collective that lost another process."""
    while error is not None:
        if any(phrase in str(error).lower() for phrase in _LOST_PEER):
            return True
        error = error.__cause__ or error.__context__
    return False


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes a command reports as one `error:` line with exit status 2."""
    from rlhf_jax.checkpoint import CheckpointMismatchError  # noqa: PLC0415
    from rlhf_jax.config import ConfigError  # noqa: PLC0415
    from rlhf_jax.data.formats import DataError  # noqa: PLC0415
    from rlhf_jax.data.tokenize import TokenizerError  # noqa: PLC0415
    from rlhf_jax.models.hf import HFCheckpointError  # noqa: PLC0415
    from rlhf_jax.sharding import ShardingError  # noqa: PLC0415

    return (CLIError, ConfigError, CheckpointMismatchError, DataError, ShardingError, HFCheckpointError,
            TokenizerError, FileNotFoundError, FileExistsError, _dist.DistributedError)


def _training_halted() -> tuple[type[BaseException], ...]:
    from rlhf_jax.train.loop import TrainingHalted  # noqa: PLC0415
    from rlhf_jax.train.results import ChecksMissed  # noqa: PLC0415

    return TrainingHalted, ChecksMissed


def _leave(code: int) -> int:
    """`code`, or in a multi-process run an immediate exit with it (no shutdown barrier to wait in)."""
    if _process_label():
        sys.stdout.flush()
        sys.stderr.flush()
        import jax  # noqa: PLC0415
        import time  # noqa: PLC0415

        if jax.process_index() == 0:  # it hosts the coordination service: let peers report their own error
            time.sleep(2.0)
        os._exit(code)
    return code


def _process_label() -> str:
    """` (process i of n)` in a multi-process run, else empty.

    Starts no backend: a bad argument caught before anything ran JAX (a malformed `--topology`)
    leaves in one line, without loading libtpu and its start-up notices.
    """
    import jax  # noqa: PLC0415
    from jax._src import distributed, xla_bridge  # noqa: PLC0415

    if distributed.global_state.client is None and not xla_bridge.backends_are_initialized():
        return ""  # no jax.distributed and no backend yet: a single process
    try:
        n = jax.process_count()
    except RuntimeError:
        return ""
    return f" (process {jax.process_index()} of {n})" if n > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
