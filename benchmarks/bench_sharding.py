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

Collective bytes count each collective instruction once, as it appears in the program text; a
collective inside a scanned layer loop runs once per layer, so those are multiplied by the
loop's trip count when XLA states it (`known_trip_count`), else counted once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes produced per collective kind in an HLO module's text (loop bodies x trip count).

    Args:
      hlo_text: `compiled.as_text()`.

    Returns:
      `{kind: bytes}` for the kinds present, plus `"total"`.
    """
    # Map computation name -> trip count of the while loops that call it as their body.
    trips = {}
    for m in re.finditer(r"while\(.*?body=%?([\w.\-]+).*?known_trip_count[^0-9]*(\d+)", hlo_text):
        trips[m.group(1)] = int(m.group(2))
    out: dict[str, int] = {}
    current, factor = None, 1
    for line in hlo_text.splitlines():
        header = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?.*\{\s*$", line)
        if header and "=" not in line.split("{")[0]:
            current = header.group(1)
            factor = trips.get(current, 1)
            continue
        if "=" not in line:
            continue
        lhs, rhs = line.split("=", 1)
        op = re.match(r"\s*(\([^)]*\)|\S+)\s+([\w\-]+)\(", rhs)
        if not op:
            continue
        kind = op.group(2).removesuffix("-start")
        if kind in _COLLECTIVES and not op.group(2).endswith("-done"):
            out[kind] = out.get(kind, 0) + _shape_bytes(op.group(1)) * factor
    out["total"] = sum(out.values())
    return out


def _run(args) -> list[dict]:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, REPO)
    import jax
    import numpy as np

    from rlhf_jax import host_memory  # noqa: PLC0415

    host_memory.configure_from_env()   # before JAX runs anything (importing rlhf_jax does not)
    from rlhf_jax import compile as aot
    from rlhf_jax import sharding as sh
    from rlhf_jax.sharding_lint import lint
    from rlhf_jax.models import CausalLM
    from rlhf_jax.models.presets import get_config
    from rlhf_jax.optim import OptimizerConfig, make_optimizer
    from rlhf_jax.state import create_train_state
    from rlhf_jax.steps import (
        PAIR_KEYS,
        SFT_KEYS,
        dpo_batch_keys,
        jit_model_step,
        make_dpo_step,
        make_reward_model_step,
        make_sft_step,
    )
    from rlhf_jax.testing import tiny_config

    config = tiny_config() if args.model == "tiny" else get_config(args.model)
    head = "scalar" if args.step == "reward_model" else "lm"
    lm = CausalLM(config, head=head)
    opt = OptimizerConfig(learning_rate=1e-5)
    tx = make_optimizer(opt)
    make = {"sft": make_sft_step, "reward_model": make_reward_model_step, "dpo": make_dpo_step}[args.step]
    keys = {"sft": SFT_KEYS, "reward_model": PAIR_KEYS, "dpo": dpo_batch_keys()}[args.step]
    rng = np.random.default_rng(0)

    def batch():
        tok = lambda: rng.integers(4, config.vocab_size, (args.batch, args.seq)).astype(np.int32)  # noqa: E731
        mask = np.ones((args.batch, args.seq), np.int32)
        if args.step == "sft":
            return {"tokens": tok(), "loss_mask": mask}
        return {"chosen_tokens": tok(), "chosen_loss_mask": mask, "rejected_tokens": tok(), "rejected_loss_mask": mask}

    rows = []
    for spec in args.runs:
        strategy, _, mesh_text = spec.partition(":")
        shape = {k: int(v) for k, v in (p.split("=") for p in mesh_text.split(",") if p)} if mesh_text else None
        row = {"strategy": strategy, "mesh": shape}
        try:
            mesh = sh.make_mesh(shape)
            issues = lint(lm.abstract_params(), lm.logical_axes, mesh=mesh, strategy=strategy)
            row["mesh"] = dict(mesh.shape)
            row["lint"] = [str(i) for i in issues]
            step = jit_model_step(make(lm, opt), lm, opt, mesh=mesh, strategy=strategy, batch_keys=keys,
                                  frozen_params=int(args.step == "dpo"), name=f"{args.step}_step")
            state = create_train_state(lm.init, tx, rng=0, logical_axes=lm.logical_axes, mesh=mesh, strategy=strategy)
            frozen = (jax.tree.map(lambda x: x.copy(), state.params),) if args.step == "dpo" else ()
            b = batch()
            t0 = time.perf_counter()
            compiled = step.lower(state, b, *frozen).compile()
            row["compile_s"] = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            row["argument_mib"] = mem.argument_size_in_bytes / 2**20
            row["temp_mib"] = mem.temp_size_in_bytes / 2**20
            row["peak_mib"] = max(getattr(mem, "peak_memory_in_bytes", 0) or 0,
                                  mem.argument_size_in_bytes + mem.output_size_in_bytes
                                  - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / 2**20
            row["collective_bytes"] = collective_bytes(compiled.as_text())
            row["model_flops"] = aot.step_flops(config, step=args.step, batch_size=args.batch, seq_len=args.seq)
            times = []
            for _ in range(args.steps):
                b = batch()
                t0 = time.perf_counter()
                state, metrics = compiled(state, b, *frozen)
                jax.block_until_ready((state, metrics))
                times.append(time.perf_counter() - t0)
            row["step_s"] = statistics.median(times[1:] if len(times) > 1 else times)
            row["loss"] = float(metrics["loss"])
        except Exception as e:  # a strategy that does not apply to this model/mesh: report it, go on
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        rows.append(row)
        _print_row(row)
    return rows


def _print_row(row: dict) -> None:
    if "error" in row:
        print(f"{row['strategy']:8s} {str(row['mesh']):40s} ERROR {row['error']}", flush=True)
        return
    coll = row["collective_bytes"]
    kinds = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in coll.items() if k != "total") or "none"
    print(f"{row['strategy']:8s} {str(row['mesh']):40s} compile {row['compile_s']:6.1f} s  step {row['step_s']:7.3f} s  "
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
    p.add_argument("--runs", nargs="+", default=["dp:data=8", "fsdp:fsdp=8", "tp:data=4,tensor=2",
                                                  "fsdp_tp:fsdp=4,tensor=2"], metavar="STRATEGY:MESH")
    p.add_argument("--json", default=os.path.join(REPO, "results", "bench_sharding.json"))
    args = p.parse_args(argv)
    print(f"model {args.model}, step {args.step}, batch {args.batch} x {args.seq}, {args.devices} CPU devices, "
          f"load {open('/proc/loadavg').read().split()[0]}")
    rows = _run(args)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"model": args.model, "step": args.step, "batch": args.batch, "seq": args.seq,
                   "devices": args.devices, "rows": rows}, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
