"""The programs an online run executes besides its update, as `rlhf-jax compile` plans them (`aot.plan_run`).

The sampler a GRPO, PPO, best-of-n or online DPO run builds (weight hand-off, prefill, decode loop, on
the sampler's own mesh: `aot.run_meshes`), reward-model scoring, the reference pass and online DPO's
log-prob passes, each lowered from the functions the run itself jits, on abstract arguments.
"""

from __future__ import annotations

import jax

from rlhf_jax import sharding as sh
from rlhf_jax.compile import bytes_per_device
from rlhf_jax.train.recipe import Program

__all__ = ["ONLINE_FAMILIES"]


def _with(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _handoff_program(sampler, plain):
    """The program `Sampler.load_params` runs on the trainer's `plain` weights, its arguments and a note.

    As at run time: on the sampler's own devices its hand-off program; on as many other devices (an
    off-policy trainer's) the same program there, its output then copied shard to shard; on another
    device count the weights gathered through the host to the sampler's layout, then its program.
    """
    source = {d for leaf in jax.tree.leaves(plain) for d in leaf.sharding.device_set}
    if source == set(sampler.mesh.devices.flat):
        return sampler._handoff, plain, ""
    if len(source) == sampler.mesh.devices.size:
        return (sampler._mirror_handoff(tuple(sorted(source, key=lambda d: d.id))), plain,
                "on the trainer's devices, then copied shard to shard to the sampler's")
    return sampler._handoff, _with(plain, sampler._stacked_shardings), "after a copy through the host to the sampler's"


def _handed_params(model, params):
    """What the trainer hands the sampler (abstract): `params`, or for LoRA the merged weights laid out as the base."""
    from rlhf_jax.models.lora import base_params  # noqa: PLC0415
    from rlhf_jax.train.adapters import lora_of, plain_params  # noqa: PLC0415

    if lora_of(model) is None:
        return params
    return _with(jax.eval_shape(lambda p: plain_params(model, p), params),
                 jax.tree.map(lambda x: x.sharding, base_params(params)))


def _sampler_programs(config, meshes, model, plain, *, num_samples: int, temperature: float, options,
                      greedy_baseline: bool = False):
    """The sampler of a run: weight hand-off, prefill and decode loop of `num_samples` completions for
    each of `data.batch_size` prompts, on the sampler's mesh (`run_meshes`), as `rl.rollout_parts` builds it;
    with `greedy_baseline` (ReMax) also the greedy call of one completion per prompt (its prefill only
    when it differs from the sampled one's, i.e. `num_samples` > 1).

    Returns:
      reports, uses, resident trees (`{"sampler weights": ...}`) and the prompt bucket width.
    """
    import jax.numpy as jnp  # noqa: PLC0415

    from rlhf_jax.compile import compile_program  # noqa: PLC0415
    from rlhf_jax.sampling import Categorical, Greedy, Sampler, default_prompt_buckets  # noqa: PLC0415
    from rlhf_jax.train import rl as rl_mod  # noqa: PLC0415

    _, mesh, strategy = meshes
    prompt_len, new = rl_mod._prompt_len(config), config.rollout.max_new_tokens
    sampler = Sampler(model, max_len=prompt_len + new, prompt_buckets=default_prompt_buckets(prompt_len), mesh=mesh,
                      strategy=strategy, dtype=config.rollout.sampler_dtype)
    reports, uses = [], {}
    handoff, handed, where = _handoff_program(sampler, plain)
    name = "weight hand-off (trainer -> sampler layout)"
    reports.append(compile_program(name, lambda: handoff.lower(handed), {"parameters": handed},
                                   compiler_options=options, note=where))
    uses[name] = {"parameters"}
    decode_params = _with(jax.eval_shape(sampler._handoff_fn, plain), sampler._decode_shardings)
    resident = {"sampler weights": decode_params}
    split = sh.batch_axis_size(mesh, strategy)  # `Sampler.generate` pads the prompts to its batch axes
    prompts = -(-config.data.batch_size // split) * split
    width = sampler.bucket_for(prompt_len, new)
    rows = sh.batch_sharding(mesh, strategy)
    tokens = jax.ShapeDtypeStruct((prompts, width), jnp.int32, sharding=rows)
    lengths = jax.ShapeDtypeStruct((prompts,), jnp.int32, sharding=rows)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sh.replicated(mesh))
    stop = (config.model.vocab_size - 1,)

    def prefill_and_decode(group: int, method, label: str = "", *, with_prefill: bool = True) -> bool:
        """Plan the prefill (unless `with_prefill` is False) and decode loop of `group` samples per prompt;
        False when the prefill did not compile (the decode loop cannot be laid out then)."""
        prefill = sampler._prefill.lower(decode_params, tokens, lengths, key, max_new_tokens=new, num_samples=group)
        shape_note = f"{prompts} prompts x {group} samples, prompt {width} + {new} new tokens"
        compiled = {"mesh": mesh}
        report = compile_program("sampler prefill" + label, lambda: prefill, {"sampler weights": decode_params,
                                                                            "batch": (tokens, lengths)},
                                 compiler_options=options, note=shape_note, outputs=compiled)
        if with_prefill:
            reports.append(report)
            uses[report.name] = {"sampler weights"}
        if "shardings" not in compiled:
            return False
        # The loop state as the compiled prefill lays it out (rows over the batch axes, cache heads split).
        out_shardings = jax.tree.unflatten(jax.tree.structure(prefill.out_info), jax.tree.leaves(compiled["shardings"]))
        state_abs_s = jax.tree.map(lambda o, s: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s), prefill.out_info,
                                   out_shardings)
        kv = [state_abs_s.prompt_k, state_abs_s.prompt_v, state_abs_s.cache_k, state_abs_s.cache_v]
        decode_groups = {"sampler weights": decode_params, "KV cache": kv, "batch": (tokens, lengths)}
        name = "sampler decode loop" + label
        reports.append(compile_program(
            name, lambda: sampler._decode.lower(decode_params, state_abs_s, tokens, lengths, method=method,
                                                stop_ids=stop, num_samples=group,
                                                min_new_tokens=config.rollout.min_new_tokens),
            decode_groups, compiler_options=options, unknown_trip_count=new,
            note=f"{shape_note}; FLOPs for all {new} steps, KV cache {bytes_per_device(kv) / 2**30:.3f} GiB per device"))
        uses[name] = {"sampler weights"}
        return True

    if prefill_and_decode(num_samples, Categorical(temperature=temperature)) and greedy_baseline:
        # One greedy completion per prompt (ReMax's baseline): the same prefill when num_samples is 1.
        prefill_and_decode(1, Greedy(), " (greedy baseline)", with_prefill=num_samples != 1)
    return reports, uses, resident, width


def _reward_model_programs(config, mesh, width: int, options):
    """Reward-model scoring (`RewardModelReward`'s program on the trainer's mesh) when the rewards use one."""
    import jax.numpy as jnp  # noqa: PLC0415

    from rlhf_jax.compile import compile_program  # noqa: PLC0415
    from rlhf_jax.models import CausalLM  # noqa: PLC0415
    from rlhf_jax.rollout import sequence_scores  # noqa: PLC0415

    if "reward_model" not in config.rewards.functions:
        return [], {}, {}
    strategy, new = config.mesh.strategy, config.rollout.max_new_tokens
    rm = CausalLM(config.model, head="scalar")
    rm_params = _with(rm.abstract_params(), sh.param_shardings(rm.abstract_params(), rm.logical_axes, mesh=mesh,
                                                             strategy=strategy))
    b = config.rewards.reward_model_batch_size
    data = sh.batch_sharding(mesh, strategy)
    rollout = (jax.ShapeDtypeStruct((b, width), jnp.int32, sharding=data),
               jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data),
               jax.ShapeDtypeStruct((b, new), jnp.int32, sharding=data),
               jax.ShapeDtypeStruct((b, new), jnp.float32, sharding=data))

    def scoring(p, *r):  # RewardModelReward's program
        with sh.activation_sharding(mesh, strategy):
            return sequence_scores(rm, p, *r)

    score = jax.jit(scoring)
    report = compile_program(
        "reward-model scoring", lambda: score.lower(rm_params, *rollout), {"reward model": rm_params,
                                                                             "batch": rollout},
        compiler_options=options, note=f"{b} rows per call; the policy's architecture (the checkpoint's "
                                       "config when it exists at run time)")
    return [report], {report.name: {"reward model"}}, {"reward model": rm_params}


def _rl_programs(config, program: Program, meshes, state_abs, options):
    """Online RL: weight hand-off, sampler prefill and decode loop (and ReMax's greedy call), reference pass,
    reward-model scoring."""
    from rlhf_jax.compile import compile_program  # noqa: PLC0415
    from rlhf_jax.train import rl as rl_mod  # noqa: PLC0415

    mesh, strategy = meshes[0], config.mesh.strategy
    algorithm = program.parts["algorithm"]
    plain = _handed_params(algorithm.policy, algorithm.lm_params(state_abs.policy.params))
    reports, uses, resident, width = _sampler_programs(config, meshes, algorithm.sampling_model, plain,
                                                       num_samples=algorithm.group_size,
                                                       temperature=config.algorithm.temperature, options=options,
                                                       greedy_baseline=config.algorithm.greedy_baseline)
    if len(reports) < 3:  # the prefill did not compile
        return reports, uses, resident
    batch = program.batch
    if config.algorithm.uses_reference:
        ref_fn = rl_mod._reference_logps(algorithm.reference_model, config.algorithm, mesh, strategy)
        reference = algorithm.reference_params(state_abs)  # what the run passes (a LoRA policy's base)
        args = (reference, batch["prompt_tokens"], batch["prompt_lengths"], batch["completion_tokens"])
        reports.append(compile_program(
            "reference log-probs", lambda: ref_fn.lower(*args, group_size=algorithm.reference_group),
            {"reference": reference, "batch": args[1:]}, compiler_options=options))
        uses["reference log-probs"] = {"reference"} if state_abs.reference is not None else {"parameters"}
    more = _reward_model_programs(config, mesh, width, options)
    return reports + more[0], {**uses, **more[1]}, {**resident, **more[2]}


def _best_of_n_programs(config, program: Program, meshes, state_abs, options):
    """Best-of-n: the sampler of `samples_per_prompt` completions per prompt and reward-model scoring."""
    from rlhf_jax.train.adapters import plain_model  # noqa: PLC0415

    model = program.parts["model"]
    reports, uses, resident, width = _sampler_programs(
        config, meshes, plain_model(model), _handed_params(model, state_abs.params),
        num_samples=config.algorithm.samples_per_prompt, temperature=config.algorithm.temperature, options=options)
    more = _reward_model_programs(config, meshes[0], width, options) if len(reports) == 3 else ([], {}, {})
    return reports + more[0], {**uses, **more[1]}, {**resident, **more[2]}


def _online_dpo_programs(config, program: Program, meshes, state_abs, options):
    """Online DPO: the sampler of 2 completions per prompt, reward-model scoring (no judge), and the
    summed log-prob pass of the reference (and of the policy when the sampler's log-probs are not its own)."""
    import jax.numpy as jnp  # noqa: PLC0415

    from rlhf_jax.compile import compile_program  # noqa: PLC0415
    from rlhf_jax.models.lora import base_params  # noqa: PLC0415
    from rlhf_jax.train import rl as rl_mod  # noqa: PLC0415
    from rlhf_jax.train.adapters import lora_of, plain_model  # noqa: PLC0415
    from rlhf_jax.rollout import completion_logprob_pass  # noqa: PLC0415

    model, mesh = program.parts["model"], meshes[0]
    policy, params = plain_model(model), state_abs.params
    plain = _handed_params(model, params)
    reports, uses, resident, width = _sampler_programs(config, meshes, policy, plain, num_samples=2,
                                                       temperature=config.algorithm.temperature, options=options)
    if len(reports) < 3:
        return reports, uses, resident
    if config.judge is None:
        more = _reward_model_programs(config, mesh, width, options)
        reports, uses, resident = reports + more[0], {**uses, **more[1]}, {**resident, **more[2]}
    # online_dpo._trainer's pass, on the sampled rows as one process passes them (host arrays)
    logps = completion_logprob_pass(policy, mesh=mesh, strategy=config.mesh.strategy)
    n = 2 * config.data.batch_size
    rows = (jax.ShapeDtypeStruct((n, width), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.int32),
            jax.ShapeDtypeStruct((n, config.rollout.max_new_tokens), jnp.int32))
    passes = []
    if config.algorithm.objective.needs_reference:  # a fresh copy of the starting weights (LoRA: its base)
        reference = params if lora_of(model) is None else base_params(params)
        resident["reference"] = reference
        passes.append(("reference log-probs", "reference", reference))
    if config.algorithm.temperature != 1.0 or rl_mod.sampler_numerics_differ(config, policy):
        passes.append(("policy log-probs", "parameters", plain))
    for name, kind, tree in passes:
        reports.append(compile_program(name, lambda tree=tree: logps.lower(tree, *rows), {kind: tree, "batch": rows},
                                       compiler_options=options, note=f"{n} sampled completions"))
        uses[name] = {kind}
    return reports, uses, resident


ONLINE_FAMILIES = {"grpo": _rl_programs, "ppo": _rl_programs, "rejection_sampling": _best_of_n_programs,
                   "online_dpo": _online_dpo_programs}
