"""Benchmark: one training step under several sharding strategies and mesh shapes.

    python benchmarks/bench_sharding.py                                   # tiny model, 8 simulated CPU devices
    python benchmarks/bench_sharding.py --model w1 --devices 8 --batch 8 --seq 256 \\
        --runs "dp:data=8" "fsdp:fsdp=8" "tp:data=4,tensor=2" "fsdp_tp:fsdp=4,tensor=2"

For each `strategy:mesh` it builds the step (`--step sft|reward_model|dpo`), compiles it, runs a
few steps on the devices present and reports: compile time, median step time, per-device
argument / temporary / peak memory (XLA's memory analysis), and the bytes moved by collectives
(all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute) read from the compiled
HLO, per collective kind. It prints a table and writes JSON. On CPU the devices are simulated
(`--devices`, set before JAX starts), so step times show the strategies' overheads on one
machine, not a pod's speed; collective bytes and memory are what a pod would see per device.

Collective bytes are each collective's per-device result times the runs of the loop that holds
it (a collective inside the scanned layer loop counts once per layer), read by
`rlhf_jax.hlo_analysis` as `rlhf-jax compile` reads them. The measurement itself is
`rlhf_jax.sharding_report` (shared with notebooks/03_sharding_strategies.ipynb).

For a TPU slice (needs libtpu, no TPU): `--topology v5p:4x4x4` (or `v5litepod-16`, `v5p-128`, ...)
compiles every strategy x mesh for the slice's compile-only devices and prints per-device memory and
collective bytes of the compiled TPU programs (no timing: those devices cannot run; loop trip
counts come from the loop condition, which TPU programs state instead of `known_trip_count`, and
TPU's windowed-einsum loops that fuse a reduce-scatter or all-gather with its matmul count under
that kind):

    python benchmarks/bench_sharding.py --topology v5p:4x4x4 --model w1 --step sft --batch 64 --seq 512
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_RUNS = ["dp:data=8", "fsdp:fsdp=8", "tp:data=4,tensor=2", "fsdp_tp:fsdp=4,tensor=2"]
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _topology_runs(n: int) -> list[str]:
    """Strategies x meshes over a slice of `n` devices: pure data parallel, FSDP, and tensor parallel 4 / 8."""
    runs = [f"dp:data={n}", f"fsdp:fsdp={n}"]
    for t in (4, 8):
        if n % t == 0 and n > t:
            runs += [f"tp:data={n // t},tensor={t}", f"fsdp_tp:fsdp={n // t},tensor={t}"]
    return runs


def _run(args) -> list[dict]:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, REPO)
    from rlhf_jax import host_memory  # noqa: PLC0415

    host_memory.configure_from_env()   # before JAX runs anything (importing rlhf_jax does not)
    from rlhf_jax.targets import resolve_target
    from rlhf_jax.models.presets import get_config
    from rlhf_jax.sharding_report import compile_strategy, measure_strategy

    config = get_config(args.model)
    devices = None
    if args.topology:
        target = resolve_target(args.topology)
        devices = list(target.devices)
        print(f"target {target.label}: {len(devices)} devices, {target.memory_bytes / 2**30:.1f} GiB each "
              "(compile only, no timing)", flush=True)
    rows = []
    for spec in args.runs or (_topology_runs(len(devices)) if devices else DEFAULT_RUNS):
        strategy, _, mesh_text = spec.partition(":")
        shape = {k: int(v) for k, v in (p.split("=") for p in mesh_text.split(",") if p)} if mesh_text else None
        try:
            if devices is not None:
                row = compile_strategy(config, step=args.step, strategy=strategy, mesh_shape=shape,
                                       batch_size=args.batch, seq_len=args.seq, devices=devices).row
            else:
                row = measure_strategy(config, step=args.step, strategy=strategy, mesh_shape=shape,
                                       batch_size=args.batch, seq_len=args.seq, timed_steps=args.steps)
        except Exception as e:  # a strategy that does not apply to this model/mesh: report it, go on
            row = {"strategy": strategy, "mesh": shape, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
        rows.append(row)
        _print_row(row)
    return rows


def _print_row(row: dict) -> None:
    if "error" in row:
        print(f"{row['strategy']:8s} {str(row['mesh']):40s} ERROR {row['error']}", flush=True)
        return
    coll = row["collective_bytes"]
    kinds = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in coll.items() if k != "total") or "none"
    step = f"{row['step_s']:7.3f} s" if "step_s" in row else "      -  "
    print(f"{row['strategy']:8s} {str(row['mesh']):40s} compile {row['compile_s']:6.1f} s  step {step}  "
          f"args {row['argument_mib']:8.1f} MiB  temp {row['temp_mib']:8.1f} MiB  peak {row['peak_mib']:8.1f} MiB  "
          f"collectives {coll['total'] / 2**20:8.1f} MiB ({kinds})", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny or a preset of rlhf_jax.models.presets (e.g. w1)")
    p.add_argument("--step", default="sft", choices=["sft", "reward_model", "dpo"])
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="timed steps per run (the first is dropped)")
    p.add_argument("--runs", nargs="+", default=None, metavar="STRATEGY:MESH",
                   help=f"default {' '.join(DEFAULT_RUNS)} (or, with --topology, dp/fsdp/tp/fsdp_tp over the slice)")
    p.add_argument("--topology", default=None,
                   help="compile for a TPU slice instead (v5p:4x4x4, v5litepod-16, ...; needs libtpu)")
    p.add_argument("--json", default=os.path.join(REPO, "results", "bench_sharding.json"))
    args = p.parse_args(argv)
    where = args.topology or f"{args.devices} CPU devices"
    print(f"model {args.model}, step {args.step}, batch {args.batch} x {args.seq}, {where}, "
          f"load {open('/proc/loadavg').read().split()[0]}")
    rows = _run(args)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"model": args.model, "step": args.step, "batch": args.batch, "seq": args.seq,
                   "devices": args.devices, "topology": args.topology, "rows": rows}, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
