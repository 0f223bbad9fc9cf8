"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; TRL's
`OnlineDPOTrainer`) and iterative DPO (Xiong et al. 2024; Xu et al. 2023, "Some things are more
CRINGE than others").

    config = OnlineDPOConfig(name="odpo", checkpoint=CheckpointConfig(init_from="runs/sft/checkpoints"),
                             rewards=RewardConfig(functions=("reward_model",), reward_model="runs/rm/checkpoints"))
    summary = train(config)                       # or config.judge = JudgeConfig(model="runs/judge/checkpoints")

Each step: two completions per prompt for `data.batch_size` prompts from the current policy
(`algorithm.temperature`); a ranker picks the preferred one, either the reward sources
(`rewards.functions`: a reward model, the synthetic task's grader, any function; the higher total
wins) or a pairwise LLM judge (`judge`, `rlhf_jax.rewards.judges`: both orders averaged; the first
wins when `P(first better) > 1/2`); then one update of a DPO-family objective
(`algorithm.objective`: `DPO` with any loss type, `SimPO`, `ORPO`) on the ranked pairs. A tie (two
identical completions, equal totals, a judge probability of exactly 1/2) has no winner: the pair
is left out of the update and its metrics (its rows are empty, as `rlaif.label_pairs` leaves ties
out), and counted in `objective/ties` (reward sources) or `judge/ties` (judge). A step whose pairs
are all ties applies no update (the optimizer state is unchanged; no `loss` or `rewards/*` logged).
(TRL ranks a tie as first-preferred.) The reference is the starting policy; its log-probs of the
sampled completions are computed once per step and enter the step as precomputed values.

Metrics (TRL's names): `objective/kl` (mean over completions of `sum_t log pi - log pi_ref`),
`objective/entropy` (mean of `-sum_t log pi`), `objective/non_score_reward` (`-beta * kl`), with
reward sources `objective/scores` and `objective/rlhf_reward` (`scores - beta * kl`) over every
sampled completion and `objective/scores_margin` (chosen - rejected) over the untied pairs,
`objective/ties` / `judge/ties`, `rewards/chosen`, `rewards/rejected`,
`rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected` (the DPO step's, before
its update), `val/contain_eos_token`, `beta`; with a judge `judge/position_consistency`,
`judge/prob_first_mean`, `judge/position_bias`. Log-probs of these metrics are at temperature 1.
A reference-free objective (SimPO, ORPO) has no reference: the KL metrics (`objective/kl`,
`objective/non_score_reward`, `objective/rlhf_reward`) are left out.
Evaluation as the offline DPO run's (`dpo.SampleEvalConfig`): on a synthetic task with a gold
reward, `eval/gold_reward` and `eval/gold_win_rate` against the starting policy (another `data.eval`
is refused: it would be read and never evaluated).

`iterative_dpo(...)` runs rounds of (sample `n` completions per prompt from the current policy,
label best and worst with the reward sources, write a TRL preference file, run offline DPO from
the previous round's policy, which is also that round's reference), each round a `stages.Stage`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding as sh
from rlhf_jax._checks import is_finite_number
from rlhf_jax.config import ConfigError
from rlhf_jax.distributed import gather_rows
from rlhf_jax.rewards.registry import RewardConfig
from rlhf_jax.rollout import completion_logprob_pass
from rlhf_jax.steps import DPO, ORPO, SimPO, make_dpo_step
from rlhf_jax.steps.preference import dpo_batch_keys
from rlhf_jax.train import dpo
from rlhf_jax.train.adapters import check_mergeable, make_model, plain_model, plain_params
from rlhf_jax.train.data import batches_from, check_batch_size, device_batch, train_batches
from rlhf_jax.train.recipe import Context, Recipe, Trainer, run
from rlhf_jax.train.rejection_sampling import best_of_n_batch
from rlhf_jax.train.rl import check_rewards, check_rope_context, rollout_parts, sampler_numerics_differ
from rlhf_jax.train.rlaif import JudgeConfig, check_judge, load_judge, sample_completions, write_preferences
from rlhf_jax.train.rollouts import RolloutConfig
from rlhf_jax.train.run_config import RunConfig
from rlhf_jax.train.stages import Stage, run_stages
from rlhf_jax.train.supervised import model_program

__all__ = ["OnlineDPO", "OnlineDPOConfig", "RECIPE", "rank_pairs", "identical_pairs", "pair_batch",
           "online_dpo_metrics", "train", "best_and_worst", "iterative_dpo"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnlineDPO:
    """The online DPO algorithm section.

    Attributes:
      objective: the paired DPO-family objective (`DPO(...)`, `SimPO(...)`, `ORPO(...)`).
      temperature: sampling temperature of the two completions.
    """

    objective: DPO | SimPO | ORPO = DPO(beta=0.1)
    temperature: float = 1.0

    def __post_init__(self):
        if not isinstance(self.objective, (DPO, SimPO, ORPO)):
            raise ConfigError(f"algorithm.objective must be DPO, SimPO or ORPO (paired), got "
                              f"{type(self.objective).__name__}")
        if not (is_finite_number(self.temperature) and self.temperature > 0):  # inf: a uniform sampler
            raise ConfigError(f"algorithm.temperature must be a finite number > 0, got {self.temperature!r}")


_RANK_BY_REWARD_MODEL = RewardConfig(functions=("reward_model",))


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnlineDPOConfig(RunConfig):
    """An online DPO run: `RunConfig` plus the algorithm, sampling, ranker and gold-evaluation sections.

    `data.train` / `data.eval` are prompt sources. The ranker is `judge` when set, else the reward
    sources of `rewards` (or the `reward_sources` given to `train`).
    """

    algorithm: OnlineDPO = OnlineDPO()
    rollout: RolloutConfig = RolloutConfig(max_new_tokens=24)
    rewards: RewardConfig = _RANK_BY_REWARD_MODEL
    judge: JudgeConfig | None = None
    sampling: dpo.SampleEvalConfig = dpo.SampleEvalConfig()
    logits_chunk_size: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.train.micro_batches != 1:
            raise ConfigError("train.micro_batches must be 1 for online DPO")
        if self.data.pack:
            raise ConfigError("data.pack must be false for online DPO prompt batches")
        check_rope_context(self)
        if self.rollout.dynamic_sampling:
            raise ConfigError("rollout.dynamic_sampling does not apply to online DPO (each prompt's two completions "
                              "are ranked, ties left out); set it false")
        task = self.data.task("eval")
        if self.data.eval is not None and (task is None or task.gold_metric != "eval/gold_reward"):
            raise ConfigError(f"data.eval {self.data.eval!r}: online DPO evaluates only by sampling a synthetic task "
                              "with a gold reward (synthetic:vowel; see `sampling`), so these prompts would be read "
                              "and never evaluated; set data.eval to such a task or None")
        if self.rollout.eval_greedy:
            raise ConfigError("rollout.eval_greedy does not apply to online DPO: its evaluation samples at "
                              "sampling.temperature (the gold evaluation, dpo.SampleEvalConfig); set it false")
        if self.judge is not None and self.rewards != _RANK_BY_REWARD_MODEL:
            raise ConfigError("online DPO ranks with either judge or rewards, not both: judge is set and rewards is "
                              f"{self.rewards!r}, which the judge would silently replace; leave rewards at its default "
                              "or set judge=None")

    @property
    def row_len(self) -> int:
        """Tokens per training row: the widest prompt plus the completion budget."""
        return (self.data.max_prompt_len or self.data.row_len) + self.rollout.max_new_tokens


def _check(config: OnlineDPOConfig, hooks: Mapping[str, Any]) -> None:
    if hooks.get("judge") is not None and (hooks.get("reward_sources") is not None
                                           or hooks.get("reward_weights") is not None):
        raise ConfigError("online DPO train(): pass judge or reward_sources (and reward_weights), not both: one "
                          "ranker ranks the pairs")
    if config.judge is None and hooks.get("judge") is None:
        check_rewards(config, hooks)
    if config.judge is not None and hooks.get("judge") is None:
        check_judge(config.judge)
    # The update takes `data.batch_size` ranked pairs (load_run_data skips this check for prompt runs).
    check_batch_size(None, config.data, mesh=config.mesh.make_mesh(), strategy=config.mesh.strategy,
                     micro_batches=config.train.micro_batches)


# ------------------------------------------------------------------------------ the math

def rank_pairs(first_better: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the chosen and rejected completion of each contiguous pair `(2i, 2i + 1)`.

    `chosen_i = 2i + (1 - f_i)`, `rejected_i = 2i + f_i`, with `f_i = 1` when the first is preferred.
    """
    f = np.asarray(first_better, bool).astype(np.int64)
    base = 2 * np.arange(len(f))
    return base + 1 - f, base + f


def identical_pairs(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """`[P]` bool: the two completions of pair `i` (rows `2i`, `2i + 1`) are the same tokens (a tie)."""
    t = np.where(np.asarray(arrays["completion_mask"], bool), arrays["completion_tokens"], -1)
    return np.all(t[0::2] == t[1::2], axis=1)


def online_dpo_metrics(policy_logps: np.ndarray, ref_logps: np.ndarray | None, *, beta: float,
                       scores: np.ndarray | None = None, chosen: np.ndarray | None = None,
                       rejected: np.ndarray | None = None) -> dict[str, float]:
    """TRL's online-DPO objective metrics from summed completion log-probs `[N]` (and scores `[N]`).

    `kl_i = log pi(y_i) - log pi_ref(y_i)` (summed over tokens); `objective/kl = mean kl`,
    `objective/entropy = mean(-log pi(y_i))`, `objective/non_score_reward = -beta mean kl`; with
    scores `objective/scores = mean s`, `objective/rlhf_reward = mean(s - beta kl)` and
    `objective/scores_margin = mean(s_chosen - s_rejected)`. With `ref_logps` None (a
    reference-free objective: SimPO, ORPO) the three KL metrics are left out.
    """
    out = {"objective/entropy": float(-np.mean(policy_logps)), "beta": float(beta)}
    kl = None
    if ref_logps is not None:
        kl = np.asarray(policy_logps, np.float64) - np.asarray(ref_logps, np.float64)
        out.update({"objective/kl": float(kl.mean()), "objective/non_score_reward": float(-beta * kl.mean())})
    if scores is not None:
        s = np.asarray(scores, np.float64)
        out["objective/scores"] = float(s.mean())
        if kl is not None:
            out["objective/rlhf_reward"] = float(np.mean(s - beta * kl))
        if chosen is not None and rejected is not None:
            out["objective/scores_margin"] = float(np.mean(s[chosen] - s[rejected]))
    return out


def pair_batch(arrays: Mapping[str, np.ndarray], chosen: np.ndarray, rejected: np.ndarray, *, ref_logps: np.ndarray,
               pad_id: int, width: int, rows: int) -> dict[str, np.ndarray]:
    """A DPO step's batch from sampled pairs: `chosen_*` / `rejected_*` tokens and completion loss
    masks (`rejection_sampling.best_of_n_batch`'s layout, padded to `width` tokens and `rows` rows,
    empty rows masked out) and the reference's summed log-probs `ref_chosen_logps` / `ref_rejected_logps`."""
    out = {}
    for side, idx in (("chosen", chosen), ("rejected", rejected)):
        part = best_of_n_batch(dict(arrays), idx, np.ones(len(idx), bool), pad_id)
        tokens = np.full((rows, width), pad_id, np.int32)
        mask = np.zeros((rows, width), np.float32)
        t = part["tokens"].shape[1]
        tokens[:len(idx), :t] = part["tokens"]
        mask[:len(idx), :t] = part["loss_mask"]
        out[f"{side}_tokens"], out[f"{side}_loss_mask"] = tokens, mask
        ref = np.zeros(rows, np.float32)
        ref[:len(idx)] = ref_logps[idx]
        out[f"ref_{side}_logps"] = ref
    return out


# ------------------------------------------------------------------------------ the recipe

def _build(config: OnlineDPOConfig, mesh):
    check_mergeable(config)
    model = make_model(config)
    objective = config.algorithm.objective
    update = make_dpo_step(model, config.optim, objective=objective, reference="precomputed",
                           logits_chunk_size=config.logits_chunk_size, nonfinite=config.train.nonfinite)
    keys = dpo_batch_keys(objective, "precomputed")
    seq = dataclasses.replace(config, data=dataclasses.replace(config.data, seq_len=config.row_len))
    program = model_program(seq, mesh, model=model, update=update, kind="preference", batch_keys=keys,
                            name="online_dpo_step")
    b = config.data.batch_size
    data = next(iter(program.batch.values())).sharding
    batch = {k: v for k, v in program.batch.items() if k in keys}
    if objective.needs_reference:
        batch.update({k: jax.ShapeDtypeStruct((b,), jnp.float32, sharding=data)
                      for k in ("ref_chosen_logps", "ref_rejected_logps")})
    return dataclasses.replace(program, batch=batch)


def _trainer(ctx: Context) -> Trainer:
    config, mesh, strategy = ctx.config, ctx.mesh, ctx.config.mesh.strategy
    objective = config.algorithm.objective
    model = ctx.program.parts["model"]
    policy = plain_model(model)
    judge = ctx.hooks.get("judge") or (None if config.judge is None else load_judge(config.judge, config.model))
    hooks = dict(ctx.hooks)
    if judge is not None and hooks.get("reward_sources") is None:
        hooks["reward_sources"] = []  # the judge ranks; no reward function is built
    collector, _ = rollout_parts(config, ctx.data, mesh, policy, 2, hooks)
    sampler = collector.sampler
    reference = dpo.reference_params(model, config, mesh)
    logps = completion_logprob_pass(policy, mesh=mesh, strategy=strategy)
    batches = batches_from(train_batches(ctx.data.train, config.data), ctx.extras)
    pad_id = ctx.data.tokenizer.pad_token_id or 0
    key, counter = jax.random.key(config.seed), [ctx.run.restore_step or 0]
    beta = getattr(objective, "beta", 0.0)
    # The sampler's log-probs are the policy's at temperature 1 unless it runs in other dtypes
    # (`rollout.sampler_dtype`): then `objective/kl` would hold the dtype gap, so recompute them.
    own_from_sampler = config.algorithm.temperature == 1.0 and not sampler_numerics_differ(config, policy)

    def summed(fn_params, arrays):  # this process's sampled rows, as one global batch with the other processes'
        rows = (arrays["prompt_tokens"], arrays["prompt_lengths"], arrays["completion_tokens"])
        lp = sh.apply_to_local_rows(lambda *a: logps(fn_params, *a), rows, mesh=mesh, strategy=strategy)
        return np.sum(np.where(arrays["completion_mask"], lp, 0.0), axis=1)

    def step_fn(state, prompt_batch):
        counter[0] += 1
        began = time.perf_counter()
        params = plain_params(model, state.params)
        arrays = collector.sample(sampler.load_params(params), prompt_batch, collector.train_sampling,
                                  jax.random.fold_in(key, counter[0]))
        metrics: dict[str, float] = {"time/generate": time.perf_counter() - began}
        start = time.perf_counter()
        scores = None
        same = identical_pairs(arrays)
        if judge is not None:
            inputs = collector.reward_inputs(arrays)
            verdict = judge.prefer(inputs.prompts[0::2], inputs.completions[0::2], inputs.completions[1::2])
            prob = np.asarray(verdict.prob_first, np.float64)
            if prob.shape != same.shape or not np.all((prob >= 0) & (prob <= 1)):  # NaN included
                raise ValueError(f"online DPO: the judge's prob_first must be {len(same)} probabilities in [0, 1] "
                                 f"(one per prompt's pair); got shape {prob.shape}, values {prob[:8].tolist()}")
            first, tie, ties_key = prob > 0.5, same | (prob == 0.5), "judge/ties"
            metrics.update(verdict.metrics())
        else:
            scores = np.asarray(collector.score(arrays).total, np.float64)
            first, tie, ties_key = scores[0::2] > scores[1::2], same | (scores[0::2] == scores[1::2]), "objective/ties"
        chosen, rejected = (idx[~tie] for idx in rank_pairs(first))
        g = lambda x: gather_rows(np.asarray(x))  # noqa: E731 - the global batch's values
        untied = int(np.sum(g(~tie)))  # over every process: all run the step, or none
        metrics[ties_key] = float(np.sum(g(tie)))
        metrics["time/rank"] = time.perf_counter() - start
        start = time.perf_counter()
        ref = summed(reference, arrays) if objective.needs_reference else np.zeros(len(first) * 2)
        if own_from_sampler:
            own = np.sum(np.where(arrays["completion_mask"], arrays["sampler_logps"], 0.0), axis=1)
        else:
            own = summed(params, arrays)
        metrics["time/reference"] = time.perf_counter() - start
        if untied:  # all pairs tied: no update
            host = pair_batch(arrays, chosen, rejected, ref_logps=ref, pad_id=pad_id, width=config.row_len,
                              rows=config.data.batch_size)
            keys = dpo_batch_keys(objective, "precomputed")
            start = time.perf_counter()
            state, step_metrics = ctx.program.step(state, device_batch({k: host[k] for k in keys}, mesh, strategy))
            metrics.update(jax.block_until_ready(step_metrics))
            metrics["time/update"] = time.perf_counter() - start
        metrics.update(online_dpo_metrics(g(own), g(ref) if objective.needs_reference else None, beta=beta,
                                          scores=None if scores is None else g(scores)))
        if scores is not None and untied:  # local indices: gather the margins, not the indices
            metrics["objective/scores_margin"] = float(np.mean(g(scores[chosen] - scores[rejected])))
        metrics["val/contain_eos_token"] = float(np.mean(~g(arrays["truncated"])))
        metrics["completions/mean_length"] = float(np.mean(g(arrays["lengths"])))
        return state, metrics

    gold = dpo._gold_eval(ctx, reference)  # noqa: SLF001 - the offline DPO run's own evaluation
    evaluate = None if gold is None else (lambda state: gold(state.params))
    return Trainer(step=step_fn, batches=batches, extras=lambda: {"data": batches.get_state()}, evaluate=evaluate)


RECIPE = Recipe(name="online_dpo", data_kind=lambda config: "prompt", build=_build, trainer=_trainer,
                progress_keys=("loss", "objective/scores", "objective/kl", "rewards/margins"), check=_check)


def train(config: OnlineDPOConfig, *, reward_sources=None, reward_weights=None, judge=None) -> dict[str, Any]:
    """Run (or resume) online DPO; return the run's summary.

    Args:
      config: the run configuration.
      reward_sources, reward_weights: rank with these reward sources instead of `config.rewards`.
      judge: rank with this `PairwiseJudge` instead (overrides `config.judge` and the rewards).
    """
    return run(RECIPE, config, reward_sources=reward_sources, reward_weights=reward_weights, judge=judge)


# ------------------------------------------------------------------------------ iterative DPO

def best_and_worst(scores: Sequence[float]) -> tuple[int, int] | None:
    """Indices of the highest and lowest score (first on ties), or None when all scores are equal.

    Raises:
      ValueError: a score that is not a finite number.
    """
    s = np.asarray(scores, np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"best_and_worst: scores must be finite numbers, got {s.tolist()}")
    best, worst = int(np.argmax(s)), int(np.argmin(s))
    return None if s[best] == s[worst] else (best, worst)


def iterative_dpo(workdir: str, config: dpo.DPOConfig, *, rounds: int, samples_per_prompt: int, prompts: str,
                  reward_sources: Sequence[Any], max_new_tokens: int = 24, temperature: float = 1.0,
                  max_prompts: int | None = None) -> dict[str, Any]:
    """Iterative DPO: per round, sample `samples_per_prompt` completions of every prompt from the current
    policy, keep (best, worst) by the reward sources as a preference pair, and train offline DPO from
    that policy (also the round's reference). Round `k` is the stage `round_k` in `workdir`.

    Args:
      workdir: the chain's directory (`round_k/` runs, `round_k/pairs.jsonl` files).
      config: the DPO run of each round (`checkpoint.init_from` = the first round's policy; its
        `data.train` is replaced by the round's pairs, `data.eval` kept).
      rounds: number of rounds.
      samples_per_prompt: `n` completions per prompt (>= 2).
      prompts: the prompt source (a file or `synthetic:NAME`).
      reward_sources: the ranking reward sources (a reward model, a grader, a judge's `PointwiseJudge`).
      max_new_tokens, temperature: sampling.
      max_prompts: prompts per round (default all).

    Returns:
      `{"rounds": [{"round", "pairs", "mean_best", "mean_worst", "summary"}], "final_checkpoint"}`.
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"iterative_dpo: rounds must be a positive int, got {rounds!r}")
    if not isinstance(samples_per_prompt, int) or samples_per_prompt < 2:
        raise ConfigError(f"iterative_dpo: samples_per_prompt must be an int >= 2, got {samples_per_prompt!r}")
    policy = config.checkpoint.init_from
    if not policy:
        raise ConfigError("iterative_dpo: config.checkpoint.init_from must name the starting policy")
    out = []
    for k in range(rounds):
        name = f"round_{k}"
        rows = sample_completions(config, policy, num_samples=samples_per_prompt, source=prompts,
                                  max_new_tokens=max_new_tokens, temperature=temperature, seed=config.seed + k,
                                  sources=reward_sources, max_prompts=max_prompts)
        pairs = []
        for row in rows:
            picked = best_and_worst(row["scores"])
            if picked is None:
                continue
            extra = {c: v for c, v in row.items() if c not in ("prompt", "completions", "scores")}
            pairs.append({"prompt": row["prompt"], "chosen": row["completions"][picked[0]],
                          "rejected": row["completions"][picked[1]], **extra,
                          "score_chosen": row["scores"][picked[0]], "score_rejected": row["scores"][picked[1]]})
        if not pairs:
            raise RuntimeError(f"iterative_dpo: round {k}: every prompt's completions scored alike; no pairs")
        path = write_preferences(os.path.join(workdir, name, "pairs.jsonl"), pairs)
        stage_config = dataclasses.replace(
            config, data=dataclasses.replace(config.data, train=path),
            checkpoint=dataclasses.replace(config.checkpoint, init_from=policy))
        summary = run_stages(workdir, [Stage(name, stage_config)])[name]
        out.append({"round": k, "pairs": len(pairs), "mean_best": float(np.mean([p["score_chosen"] for p in pairs])),
                    "mean_worst": float(np.mean([p["score_rejected"] for p in pairs])), "summary": summary})
        if summary["stopped_by"]:
            break
        policy = os.path.join(summary["run_dir"], "checkpoints")
    return {"rounds": out, "final_checkpoint": policy}
