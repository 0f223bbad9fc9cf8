"""Data pipeline throughput: tokenized examples/s for 100,000 short preference pairs.

    python benchmarks/bench_data.py [--pairs 100000] [--repeats 3]

The pairs are `VowelTask().preference_rows(n, seed=0)` (prompt ~5 characters, chosen and rejected
10-18 characters each), tokenized with the offline character-level tokenizer
(`rlhf_jax.testing.tokenizer`), `max_len=48`. Timed, each `--repeats` times (median reported):

- `plain`: `load_dataset` of the in-memory rows as plain strings (parse, validate, batched
  tokenization, masks, ragged arrays);
- `chat`: the same pairs as message lists, rendered with the chat template;
- `jsonl`: `plain` read from a JSONL file (adds JSON parsing);
- `batches`: `BatchIterator` over the tokenized pairs, packed 64 rows x 128 tokens (up to 8 pairs
  a row), until every pair has been batched once.

A pair counts as one example. `foreign_cores` is how many CPU cores other processes used during the
timed runs (Linux only; above ~0.1 the machine was shared and the figures are low).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from rlhf_jax.data import BatchConfig, BatchIterator, TokenizeConfig, VowelTask, load_dataset
from rlhf_jax.testing.tokenizer import offline_tokenizer


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy jiffies of the whole machine, jiffies of this process), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(fields) - fields[3] - fields[4], sum(int(x) for x in stat[11:15])


def _timed(fn, repeats: int) -> tuple[float, float, float | None, object]:
    """Median wall and CPU seconds of `repeats` calls of `fn`, foreign cores, and the last result."""
    before, start = _cpu_jiffies(), time.perf_counter()
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    after, wall = _cpu_jiffies(), time.perf_counter() - start
    foreign = None
    if before is not None and after is not None:
        foreign = ((after[0] - before[0]) - (after[1] - before[1])) / 100.0 / wall
    return statistics.median(walls), statistics.median(cpus), foreign, result


def _line(
    name: str, n: int, wall: float, cpu: float, foreign: float | None, repeats: int, extra: str = ""
) -> str:
    shared = "n/a" if foreign is None else f"{foreign:.2f}"
    return (
        f"{name:>7}: {n / wall:10,.0f} examples/s{extra}  ({wall:.2f} s wall, median of {repeats}; "
        f"{n / cpu:,.0f} examples per CPU-second; foreign_cores {shared})"
    )


def _as_messages(row: dict) -> dict:
    return {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000, help="number of preference pairs")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.repeats < 1:
        parser.error("--pairs and --repeats must be positive")

    tokenizer = offline_tokenizer()
    config = TokenizeConfig(max_len=48)
    rows = VowelTask().preference_rows(args.pairs, seed=0)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    chat_rows = [_as_messages(r) for r in rows]
    n = len(rows)
    print(f"{n:,} preference pairs, offline char tokenizer, max_len={config.max_len}, {os.cpu_count()} CPUs")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pairs.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        cases = {
            "plain": lambda: load_dataset(rows, kind="preference", tokenizer=tokenizer, config=config),
            "chat": lambda: load_dataset(chat_rows, kind="preference", tokenizer=tokenizer, config=config),
            "jsonl": lambda: load_dataset(path, kind="preference", tokenizer=tokenizer, config=config),
        }
        for name, fn in cases.items():
            wall, cpu, foreign, dataset = _timed(fn, args.repeats)
            tokens = int(dataset.lengths().sum())
            results[name] = n / wall
            print(_line(name, n, wall, cpu, foreign, args.repeats, f" {tokens / wall:11,.0f} tokens/s"))

    dataset = cases["plain"]()
    batch_config = BatchConfig(batch_size=64, seq_len=128, pack=True, max_segments=8, num_epochs=1)

    def batch_all():
        return sum(
            int(b["example_mask"].sum())
            for b in BatchIterator(dataset, batch_config, process_index=0, process_count=1)
        )

    wall, cpu, foreign, count = _timed(batch_all, args.repeats)
    assert count == n
    results["batches"] = n / wall
    print(_line("batches", n, wall, cpu, foreign, args.repeats, " (packed 64x128)"))
    return results


if __name__ == "__main__":
    from rlhf_jax import host_memory

    host_memory.configure_from_env()   # before JAX runs anything (importing rlhf_jax does not)
    main()
