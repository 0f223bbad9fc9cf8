"""RLAIF: a generative judge trained on gold preferences labels pairs; DPO on its labels vs on gold labels.

    rlhf-jax run experiments/rlaif_tiny.py
    rlhf-jax run experiments/rlaif_tiny.py --set sft_checkpoint=runs/dpo_tiny/sft/checkpoints   # skip the policy SFT
    rlhf-jax run experiments/rlaif_tiny.py --set judge_sft.train.steps=100     # a weaker judge

The synthetic vowel task (`rlhf_jax.data.synthetic.VowelTask`). Stages:

1. the policy: SFT on demonstrations (`tiny_stages.sft_tiny`);
2. the judge: a `CausalLM` of the same tiny size trained by SFT to answer "A" or "B" after the
   pairwise judge prompt `TEMPLATE` (`{prompt}{response_a}|{response_b}>`), on gold-labelled pairs
   (another seed than the DPO pairs), each pair in both orders;
3. the judge as a `rlhf_jax.rewards.judges.PairwiseJudge` (probability of "A" vs "B" from the
   next-token logits, both orders averaged): its agreement with gold labels on held-out pairs, and
   its position-swap consistency;
4. RLAIF: the judge labels the DPO pairs (`rlaif.label_pairs`, TRL preference file); pairs whose two
   orders disagree are dropped (`CONSISTENT_ONLY`);
5. DPO from the SFT policy on the judge-labelled pairs and, as the reference point, on the same
   pairs with gold labels (`tiny_stages.vowel_dpo`: sigmoid, beta 0.1, chosen NLL weight 1, 100 steps).

Acceptance: judge agreement with gold >= `MIN_AGREEMENT` (0.85) on held-out pairs; RLAIF DPO's
held-out gold gain over the SFT policy >= `MIN_GAIN_RATIO` (0.8) x the gold-labelled DPO's (gold of
samples on 128 held-out prompts, one fixed key); recorded as `passed` in `results.json`, the exit
status does not depend on it.

Our run (`results.json`; about 12 min on the shared 2-core CPU with the policy SFT skipped): the
judge (300 SFT steps, held-out answer-token loss 0.017) agrees with gold on 99.4% of 512 held-out
pairs, with position-swap consistency 0.990 and position bias +0.001 (mean P(slot A wins) - 1/2);
on the 8192 DPO pairs it agrees on 99.2% (consistency 0.980; the 8030 consistent pairs kept agree
on 99.6%). From the SFT policy's 0.478, gold-labelled DPO gains +0.298 and RLAIF DPO +0.276:
ratio 0.93. (Earlier runs scoring the DPO policies on 64 prompts: ratio 0.89 with this judge, 0.98
with an 800-step judge.) A judge trained for 100 steps (`--set judge_sft.train.steps=100 --set
judge_sft.optim.decay_steps=80`) shows what averaging both orders buys: its two orders agree on only
59% of the held-out pairs, yet their averaged probability agrees with gold on 98.0%; 4833 of the 8192
DPO pairs are consistent (those agree with gold on 99.5%), and RLAIF DPO on them gains +0.282 against
gold-labelled DPO's +0.298 (ratio 0.95). A judge trained for only 60 steps answers the same letter whatever the order (every
pair inconsistent, nothing kept): `main` stops with that message.
Results: `runs/rlaif_tiny/results.json` and `results.png` (judge SFT loss; both DPO runs' gold reward).
"""

from __future__ import annotations

import dataclasses
import os

from rlhf_jax.config import CheckpointConfig, TrainConfig
from rlhf_jax.metrics import read_jsonl
from rlhf_jax.models.presets import get_config as model_preset
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.rewards.judges import PairwiseTemplate
from rlhf_jax.steps import DPO
from rlhf_jax.train import dpo, sft
from rlhf_jax.train import tiny_stages as tiny
from rlhf_jax.train.results import Panel, plot_metrics, write_json
from rlhf_jax.train.rlaif import JudgeConfig, label_pairs, load_judge, write_preferences, write_sft_rows
from rlhf_jax.train.run_config import DataConfig
from rlhf_jax.train.stages import Stage, checkpoints, run_stages

TEMPLATE = PairwiseTemplate(text="{prompt}{response_a}|{response_b}>", choices=("A", "B"))
MIN_AGREEMENT = 0.85
MIN_GAIN_RATIO = 0.8
CONSISTENT_ONLY = True
JUDGE_SEED = 7          # the judge's training pairs (the DPO pairs use data.seed 0)
HELD_OUT_SEED = 1_000_003  # the held-out pairs (the DPO runs' eval pairs' seed)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLAIFTinyConfig:
    """The stages; run directories under `workdir`: `sft`, `judge`, `dpo_gold`, `dpo_rlaif`.

    Attributes:
      workdir: the experiment's directory.
      sft: the policy's SFT stage.
      judge_sft: the judge's SFT stage (its data files are written by `main`).
      judge_pairs: gold pairs the judge is trained on (each in both orders).
      held_out_pairs: held-out pairs for the judge's agreement.
      dpo: the DPO stage (gold: `synthetic:vowel`; RLAIF: the judge-labelled file of the same pairs).
      sft_checkpoint: an existing policy SFT checkpoint instead of running stage 1.
    """

    workdir: str = "runs/rlaif_tiny"
    sft: sft.SFTConfig
    judge_sft: sft.SFTConfig
    judge_pairs: int = 8192
    held_out_pairs: int = 512
    dpo: dpo.DPOConfig
    sft_checkpoint: str | None = None


def get_config(arg: str | None = None) -> RLAIFTinyConfig:
    """The tiny CPU configuration (the only mode)."""
    if arg not in (None, "tiny"):
        raise ValueError(f"rlaif_tiny has only the tiny mode, got {arg!r}")
    steps = 300
    judge = sft.SFTConfig(
        name="rlaif_tiny_judge", model=model_preset("tiny"),
        data=DataConfig(train="judge_train.jsonl", eval="judge_eval.jsonl", max_len=64, batch_size=64),
        optim=OptimizerConfig(name="adamw", learning_rate=3e-3, warmup_steps=20, schedule="cosine",
                              decay_steps=steps - 20, end_learning_rate_ratio=0.1, weight_decay=0.0),
        train=TrainConfig(steps=steps, eval_every=50, eval_batches=4),
        checkpoint=CheckpointConfig(every=0, keep=1), logging=tiny.LOG)
    policy_dpo = tiny.vowel_dpo("rlaif_tiny_dpo", DPO(loss_type="sigmoid", beta=0.1, nll_weight=1.0))
    policy_dpo = dataclasses.replace(policy_dpo, sampling=dataclasses.replace(policy_dpo.sampling, num_prompts=128))
    return RLAIFTinyConfig(sft=tiny.sft_tiny("rlaif_tiny_sft"), judge_sft=judge, dpo=policy_dpo)


def judge_rows(pairs: list[dict]) -> list[dict]:
    """SFT rows of the judge: each gold pair in both orders, answered "A" or "B"."""
    a, b = TEMPLATE.choices
    rows = []
    for p in pairs:
        rows.append({"prompt": TEMPLATE.render(p["prompt"], p["chosen"], p["rejected"]), "completion": a})
        rows.append({"prompt": TEMPLATE.render(p["prompt"], p["rejected"], p["chosen"]), "completion": b})
    return rows


def _gold_curve(run_dir: str) -> list[tuple[int, float]]:
    return [(r["step"], r["eval/gold_reward"]) for r in read_jsonl(f"{run_dir}/metrics.jsonl") if "eval/gold_reward" in r]


def main(config: RLAIFTinyConfig) -> dict:
    """Policy SFT and judge SFT, the judge's agreement, labelling, then DPO on judge vs gold labels."""
    task = config.dpo.data.vowel
    work = config.workdir
    os.makedirs(work, exist_ok=True)
    train_file, eval_file = os.path.join(work, "judge_train.jsonl"), os.path.join(work, "judge_eval.jsonl")
    write_sft_rows(train_file, judge_rows(task.preference_rows(config.judge_pairs, seed=JUDGE_SEED)))
    held_out = task.preference_rows(config.held_out_pairs, seed=HELD_OUT_SEED)
    write_sft_rows(eval_file, judge_rows(held_out[:128]))
    judge_config = dataclasses.replace(config.judge_sft, data=dataclasses.replace(
        config.judge_sft.data, train=train_file, eval=eval_file))
    stages = [Stage("judge", judge_config)]
    if not config.sft_checkpoint:
        stages.insert(0, Stage("sft", config.sft))
    summaries = run_stages(work, stages)
    if any(s["stopped_by"] for s in summaries.values()):
        return list(summaries.values())[-1]

    # The judge against gold labels on held-out pairs (their given order is the gold order).
    judge = load_judge(JudgeConfig(model=checkpoints(work, "judge"), template=TEMPLATE, batch_size=256))
    gold = lambda row, completion: task.gold(row["word"], completion)  # noqa: E731
    _, held_metrics = label_pairs(judge, held_out, gold=gold)
    # RLAIF: the judge labels the DPO pairs (the gold-labelled DPO run's pairs, order hidden from it).
    dpo_pairs = task.preference_rows(config.dpo.data.num_train, seed=config.dpo.data.seed)
    labelled, label_metrics = label_pairs(judge, dpo_pairs, gold=gold)
    kept = [r for r in labelled if r["judge_consistent"]] if CONSISTENT_ONLY else labelled
    if not kept:  # a judge with a pure position bias answers the same letter in both orders
        raise RuntimeError(f"rlaif_tiny: the judge's two orders disagree on every pair (position consistency "
                           f"{label_metrics['judge/position_consistency']:.3f}); train it longer (judge_sft.train.steps)")
    rlaif_file = write_preferences(os.path.join(work, "rlaif_pairs.jsonl"), kept)

    policy = config.sft_checkpoint or checkpoints(work, "sft")
    start = dataclasses.replace(config.dpo.checkpoint, init_from=policy)
    gold_dpo = dataclasses.replace(config.dpo, checkpoint=start)
    rlaif_dpo = dataclasses.replace(config.dpo, checkpoint=start,
                                    data=dataclasses.replace(config.dpo.data, train=rlaif_file))
    dpo_summaries = run_stages(work, [Stage("dpo_gold", gold_dpo), Stage("dpo_rlaif", rlaif_dpo)])
    if any(s["stopped_by"] for s in dpo_summaries.values()) or "dpo_rlaif" not in dpo_summaries:
        return list(dpo_summaries.values())[-1]
    g_curve, r_curve = (_gold_curve(dpo_summaries[k]["run_dir"]) for k in ("dpo_gold", "dpo_rlaif"))
    sft_gold = g_curve[0][1]
    gold_gain, rlaif_gain = g_curve[-1][1] - sft_gold, r_curve[-1][1] - r_curve[0][1]
    ratio = rlaif_gain / gold_gain if gold_gain > 0 else float("nan")
    agreement = held_metrics["judge/gold_agreement"]
    results = {
        "experiment": "RLAIF: judge-labelled DPO vs gold-labelled DPO",
        "judge_final_eval_loss": summaries["judge"]["eval"].get("eval/loss"),
        "judge_held_out_agreement": agreement,
        "judge_held_out_position_consistency": held_metrics["judge/position_consistency"],
        "judge_held_out_position_bias": held_metrics["judge/position_bias"],
        "judge_dpo_pairs_agreement": label_metrics["judge/gold_agreement"],
        "judge_dpo_pairs_position_consistency": label_metrics["judge/position_consistency"],
        "rlaif_pairs_kept": len(kept),
        "rlaif_pairs_total": len(labelled),
        "rlaif_kept_pairs_agreement": _agreement(kept, task),
        "sft_policy_gold_reward": sft_gold,
        "gold_dpo_gold_curve": g_curve,
        "rlaif_dpo_gold_curve": r_curve,
        "gold_dpo_gain": gold_gain,
        "rlaif_dpo_gain": rlaif_gain,
        "gain_ratio": ratio,
        "min_agreement": MIN_AGREEMENT,
        "min_gain_ratio": MIN_GAIN_RATIO,
        "passed": bool(agreement >= MIN_AGREEMENT and ratio >= MIN_GAIN_RATIO),
        "config": config,
    }
    write_json(os.path.join(work, "results.json"), results)
    judge_records = read_jsonl(os.path.join(summaries["judge"]["run_dir"], "metrics.jsonl"))
    curves = [{"step": s, "gold-labelled DPO": g} for s, g in g_curve] + \
             [{"step": s, "judge-labelled DPO (RLAIF)": g} for s, g in r_curve]
    plot_metrics(os.path.join(work, "results.png"), judge_records + curves,
                 [Panel(title="judge SFT loss", keys=("loss", "eval/loss")),
                  Panel(title="held-out gold reward of DPO policies", keys=("gold-labelled DPO", "judge-labelled DPO (RLAIF)"),
                        target=sft_gold + MIN_GAIN_RATIO * gold_gain, target_label=f"SFT + {MIN_GAIN_RATIO} x gold gain")],
                 title=f"RLAIF: judge agreement {agreement:.3f}, gain ratio {ratio:.2f}")
    return {k: v for k, v in results.items() if k not in ("config", "gold_dpo_gold_curve", "rlaif_dpo_gold_curve")}


def _agreement(rows: list[dict], task) -> float:
    """Share of labelled rows whose chosen response has the higher gold reward (gold ties left out)."""
    agree = [task.gold(r["word"], r["chosen"]) > task.gold(r["word"], r["rejected"]) for r in rows
             if task.gold(r["word"], r["chosen"]) != task.gold(r["word"], r["rejected"])]
    return sum(agree) / max(len(agree), 1)


if __name__ == "__main__":
    import sys

    from rlhf_jax.cli import main as cli_main

    sys.exit(cli_main(["run", __file__, *sys.argv[1:]]))
