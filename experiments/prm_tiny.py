"""Process vs outcome reward models on multi-step addition: held-out step accuracy and best-of-16.

    rlhf-jax run experiments/prm_tiny.py
    rlhf-jax run experiments/prm_tiny.py --set prm.train.steps=3000 --set best_of=32

The task (`chain_rows`): a prompt of four digits, "7+5+3+1:", and a solution of three steps, each
adding the next digit to the running total modulo 10 ("7+5=2", "2+3=5", "5+1=6"), one per line
(the step separator "\\n"); the final answer is the last total (the sum mod 10). Solutions come from
a noisy solver: each step's result is off by 1 or 2 with probability `error_rate`, and later steps
continue from the written total. A step is labelled correct when its own addition is right
(PRM800K's per-step judgement); the final answer is right when no uncorrected error remains.

Two scalar-head models of the same size are trained on the same labelled solutions for the same
steps (`rlhf_jax.train.prm`, the PRM recipe; from scratch, at a constant learning rate: the tiny
model only starts to check sums after ~1000 steps, a grokking-like jump, so both get 2000):

- the **PRM**: every step end labelled (`process_reward_loss` at separator positions);
- the **ORM** (outcome reward model): only the last step end, labelled "every step correct"
  (`algorithm.outcome_only`).

Evaluation: held-out step accuracy of the PRM (`eval/accuracy`, threshold 0.5 on its step
probability); then for 256 held-out problems, `best_of` (16) candidate solutions from the noisy
solver at a higher error rate, one picked by the PRM (min over steps; also product and last) and
one by the ORM; the final-answer accuracy of each pick, against a random pick and the oracle.

Checks: PRM held-out step accuracy >= `min_step_accuracy` (0.9) and best-of-16 final-answer
accuracy by the PRM (min) > by the ORM. Writes `results.json` and `results.png` in the workdir.

Measured on a CPU (one device): PRM held-out step accuracy 0.709 (the label prior) until step ~900,
0.744 at 1000, 0.902 at 1600, 0.969 at 2000; the ORM stays at its prior (0.672 outcome accuracy).
Best-of-16 final-answer accuracy (256 problems, candidates' step error rate 0.4): PRM min 0.836,
PRM prod 0.848, PRM last 0.227, ORM 0.160, random pick 0.270, oracle 0.992.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
from rlhf_jax.models import CausalLM
from rlhf_jax.models.presets import get_config as model_preset
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.train import prm
from rlhf_jax.train.data import make_tokenizer
from rlhf_jax.train.results import check_passed, write_json
from rlhf_jax.train.run_config import DataConfig
from rlhf_jax.train.stages import Stage, run_stages
from rlhf_jax.train.weights import initial_params


MOD = 10  # running totals are kept modulo MOD (single digits)


def solve(terms: list[int], rng: np.random.Generator, error_rate: float) -> tuple[list[str], list[bool], int]:
    """A noisy left-to-right solution: `(steps, per-step correctness, final answer)`.

    Step k writes `t+x=r`, `r = (t + x) mod 10`; with probability `error_rate` its `r` is off by 1 or
    2 (mod 10), and the next step continues from the written `r`.
    """
    total, steps, labels = terms[0], [], []
    for x in terms[1:]:
        result = (total + x) % MOD
        wrong = rng.random() < error_rate
        if wrong:
            result = (result + int(rng.choice([-2, -1, 1, 2]))) % MOD
        steps.append(f"{total}+{x}={result}")
        labels.append(not wrong)
        total = result
    return steps, labels, total


def problems(n: int, *, seed: int, num_terms: int = 4) -> list[list[int]]:
    """`n` problems of `num_terms` digits."""
    rng = np.random.default_rng([seed, 7])
    return rng.integers(0, MOD, (n, num_terms)).tolist()


def prompt_of(terms: list[int]) -> str:
    return "+".join(map(str, terms)) + ":"


def chain_rows(n: int, *, seed: int, error_rate: float) -> list[dict]:
    """`n` step-labelled rows `{"prompt", "completions", "labels"}` (TRL's stepwise format)."""
    rng = np.random.default_rng([seed, 11])
    rows = []
    for terms in problems(n, seed=seed):
        steps, labels, _ = solve(terms, rng, error_rate)
        rows.append({"prompt": prompt_of(terms), "completions": steps, "labels": labels})
    return rows


_LOG = LoggingConfig(every=50, tensorboard=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PRMTinyConfig:
    """The PRM and ORM runs (`<workdir>/prm`, `<workdir>/orm`: the same config but `outcome_only`),
    the data sizes and the best-of-n evaluation."""

    workdir: str = "runs/prm_tiny"
    num_train: int = 8192
    num_eval: int = 512
    error_rate: float = 0.3
    candidates_error_rate: float = 0.4
    num_problems: int = 256
    best_of: int = 16
    min_step_accuracy: float = 0.9
    prm: prm.PRMConfig


def get_config(arg: str | None = None) -> PRMTinyConfig:
    """The tiny CPU configuration (the only mode)."""
    if arg not in (None, "tiny"):
        raise ValueError(f"prm_tiny: unknown mode {arg!r}; only the tiny mode exists")
    config = prm.PRMConfig(
        name="prm_tiny", model=model_preset("tiny"),
        data=DataConfig(train="<workdir>/data/train.jsonl", eval="<workdir>/data/eval.jsonl", max_len=40,
                        batch_size=64),
        optim=OptimizerConfig(name="adam", learning_rate=1e-3, warmup_steps=20),
        train=TrainConfig(steps=2000, eval_every=200, eval_batches=8),
        checkpoint=CheckpointConfig(every=0, keep=1), logging=_LOG)
    return PRMTinyConfig(prm=config)


def _write(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def best_of_n_eval(config: PRMTinyConfig, scorers: dict[str, tuple[prm.PRMScorer, str]]) -> dict[str, float]:
    """Final-answer accuracy of the candidate each scorer picks among `best_of` per held-out problem."""
    rng = np.random.default_rng(12345)
    n = config.best_of
    prompts, solutions, correct = [], [], []
    for terms in problems(config.num_problems, seed=999):
        for _ in range(n):
            steps, _, answer = solve(terms, rng, config.candidates_error_rate)
            prompts.append(prompt_of(terms))
            solutions.append(steps)
            correct.append(answer == sum(terms) % MOD)
    correct = np.asarray(correct).reshape(-1, n)
    out = {"random_pick": float(correct[:, 0].mean()), "oracle": float(correct.any(axis=1).mean())}
    for name, (scorer, mode) in scorers.items():
        pick = prm.best_of_n(scorer.score(prompts, solutions, mode=mode), n)
        out[name] = float(correct[np.arange(len(correct)), pick].mean())
    return out


def main(config: PRMTinyConfig) -> dict:
    """Write the data, train the PRM and the ORM, evaluate, write `results.json` + `results.png`, check."""
    os.makedirs(os.path.join(config.workdir, "data"), exist_ok=True)
    train_path = _write(os.path.join(config.workdir, "data", "train.jsonl"),
                        chain_rows(config.num_train, seed=0, error_rate=config.error_rate))
    eval_path = _write(os.path.join(config.workdir, "data", "eval.jsonl"),
                       chain_rows(config.num_eval, seed=1, error_rate=config.error_rate))
    given = config.prm.data   # the written files where the config still names `<workdir>/data/...`
    data = dataclasses.replace(given, train=train_path if given.train.startswith("<workdir>/") else given.train,
                               eval=eval_path if (given.eval or "").startswith("<workdir>/") else given.eval)
    prm_config = dataclasses.replace(config.prm, data=data)
    orm_config = dataclasses.replace(prm_config, name=prm_config.name + "_orm",
                                     algorithm=dataclasses.replace(prm_config.algorithm, outcome_only=True))
    summaries = run_stages(config.workdir, [Stage("prm", prm_config), Stage("orm", orm_config)])
    if any(s["stopped_by"] for s in summaries.values()):
        return summaries
    tokenizer = make_tokenizer(prm_config.data.tokenizer)
    model = CausalLM(prm_config.model, head="scalar")
    scorers = {}
    for stage in ("prm", "orm"):
        params = initial_params(model, os.path.join(config.workdir, stage, "checkpoints"), rng=jax.random.key(0))
        scorer = prm.PRMScorer(model, params, tokenizer, max_len=prm_config.data.max_len)
        if stage == "prm":
            scorers.update({"prm_min": (scorer, "min"), "prm_prod": (scorer, "prod"), "prm_last": (scorer, "last")})
        else:
            scorers["orm"] = (scorer, "last")
    best = best_of_n_eval(config, scorers)
    results = {
        "experiment": "prm_tiny", "steps": summaries["prm"]["step"],
        "prm_step_accuracy": summaries["prm"]["eval"]["eval/accuracy"],
        "orm_outcome_accuracy": summaries["orm"]["eval"]["eval/accuracy"],
        "best_of_n": config.best_of, "final_answer_accuracy": best,
        "passed": {"step_accuracy": summaries["prm"]["eval"]["eval/accuracy"] >= config.min_step_accuracy,
                   "prm_beats_orm": best["prm_min"] > best["orm"]},
        "config": config,
    }
    path = write_json(os.path.join(config.workdir, "results.json"), results)
    _plot(os.path.join(config.workdir, "results.png"), results)
    check_passed("prm_tiny", results["passed"], path)
    return {k: v for k, v in results.items() if k != "config"}


def _plot(path: str, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = results["final_answer_accuracy"]
    names = ["random_pick", "orm", "prm_last", "prm_prod", "prm_min", "oracle"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [acc[k] for k in names], color=["grey", "tab:orange", "tab:blue", "tab:blue", "tab:blue", "black"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("final-answer accuracy")
    ax.set_title(f"best-of-{results['best_of_n']} on multi-step addition "
                 f"(PRM step accuracy {results['prm_step_accuracy']:.3f})")
    for i, k in enumerate(names):
        ax.text(i, acc[k] + 0.02, f"{acc[k]:.2f}", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    import sys

    from rlhf_jax.cli import main as cli_main

    sys.exit(cli_main(["run", __file__, *sys.argv[1:]]))
