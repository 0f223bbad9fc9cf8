"""Ahead-of-time compilation of what a run executes: `rlhf-jax compile experiments/NAME.py`.

For each run config of an experiment, the family's recipe builds the same `Program` that
`rlhf-jax run` would run (`recipe.build(config, mesh)`: model, state shardings, jitted update with
its donation), and `rlhf_jax.compile.aot_compile` lowers and compiles `program.step` on
`program.abstract_args()` for this machine's devices or a TPU topology, reporting per-device
memory, FLOPs and whether it fits. A multi-stage experiment compiles each stage.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from rlhf_jax import sharding as sh
from rlhf_jax.compile import CompileReport, ProgramReport, aot_compile, bytes_per_device
from rlhf_jax.config import ConfigError
from rlhf_jax.targets import Target, resolve_target, tpu_topology_devices, with_device_memory_gib
from rlhf_jax.train import recipe_for
from rlhf_jax.train.aot_online import ONLINE_FAMILIES
from rlhf_jax.train.recipe import Program, with_shardings
from rlhf_jax.train.run_config import RunConfig

__all__ = ["run_configs", "run_meshes", "build_program", "compile_run", "RunPlan", "plan_run", "format_plan"]


def run_configs(config: Any) -> dict[str, RunConfig]:
    """The training runs of an experiment config: itself, or each `RunConfig` field of a multi-stage one.

    Raises:
      ConfigError: the config holds no run config.
    """
    if isinstance(config, RunConfig):
        return {config.name: config}
    stages = {}
    if dataclasses.is_dataclass(config):
        stages = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                  if isinstance(getattr(config, f.name), RunConfig)}
    if not stages:
        raise ConfigError(f"{type(config).__name__} holds no training run config to compile")
    return stages


def run_meshes(config: RunConfig, devices: list | None = None):
    """`(trainer mesh, sampler mesh, sampler strategy)` of a run of `config` over `devices` (default
    `jax.devices()`), as the run lays them out: with `off_policy.sampler_devices` the trainer takes
    the first devices and the sampler the last (`off_policy.split_devices`), with
    `off_policy.sampler_mesh` the sampler its own layout; otherwise both share one mesh.
    """
    if getattr(config, "off_policy", None) is None:
        mesh = sh.make_mesh(config.mesh.shape, devices=devices)
        return mesh, mesh, config.mesh.strategy
    from rlhf_jax.train import rl as rl_mod  # noqa: PLC0415

    mesh = rl_mod._trainer_mesh(config, devices)
    return (mesh, *rl_mod._sampler_mesh(config, mesh, devices))


def build_program(config: RunConfig, *, devices: list | None = None, topology: str | None = None) -> Program:
    """The `Program` a run of `config` executes, for its trainer's mesh over `devices` or a TPU topology's."""
    if topology is not None:
        devices = tpu_topology_devices(topology)
    return recipe_for(config).build(config, run_meshes(config, devices)[0])


def compile_run(config: RunConfig, *, devices: list | None = None, topology: str | None = None,
                device_memory_bytes: int | None = None,
                compiler_options: dict[str, Any] | None = None) -> CompileReport:
    """Compile `config`'s update step exactly as `rlhf-jax run` builds it, for its mesh.

    Args:
      config: any run config with a recipe (`rlhf_jax.train.recipe_for`).
      devices: the devices to lay the mesh over (default: `jax.devices()`).
      topology: a TPU topology such as "v5e:4x4" (compile-only devices from libtpu), instead of `devices`.
      device_memory_bytes: memory per device for the fit check (default: from the devices).
      compiler_options: XLA options, e.g. `{"xla_backend_optimization_level": 0}` for a faster CPU
        compile whose memory analysis is unchanged (buffers are assigned before code generation).
    Returns:
      The `CompileReport`.
    """
    program = build_program(config, devices=devices, topology=topology)
    state = program.abstract_args()[0]
    devices_used = list(program.step.mesh.devices.flat)
    label = topology or f"{devices_used[0].platform} x{len(devices_used)}"
    return aot_compile(program.step, program.abstract_args(), target=label, state_bytes=bytes_per_device(state),
                       device_memory_bytes=device_memory_bytes, compiler_options=compiler_options)


# ------------------------------------------------------------------------------------- run plans


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Every program a run compiles, per device, and the run's peak against the target's memory.

    Attributes:
      name: the run config's name.
      target: the target's label; note: how figures relate to it, and what a run of the family executes
        that the plan does not compile (`UNPLANNED`).
      memory_bytes: memory per device a run may use (None: unknown); memory_source: whose memory that
        is ("XLA:TPU can allocate on a v5e chip", "JAX lets XLA allocate on an H100"), memory_note: how
        it was found (`rlhf_jax.targets.Target`).
      programs: one `ProgramReport` per program the run executes.
      resident: per-device bytes that stay allocated between programs, by kind (the train state's
        parameters and optimizer state, the reference, sampler weights, reward model).
      peak_bytes: the run's peak per device: the largest over programs of the program's peak plus
        the resident buffers it does not take as arguments; peak_program names it.
      program_peaks: that sum for each program (the run's memory while the program runs).
      fits: the run's peak fits (and every program compiled).
      suggestions: `(knob, verdict)` pairs, each from compiling the changed config.
    """

    name: str
    target: str
    memory_bytes: int | None
    programs: tuple[ProgramReport, ...]
    resident: dict[str, int]
    peak_bytes: int
    peak_program: str
    fits: bool
    note: str = ""
    suggestions: tuple[tuple[str, str], ...] = ()
    program_peaks: dict[str, int] = dataclasses.field(default_factory=dict)
    memory_source: str = ""
    memory_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _state_group(path) -> str:
    """The kind of a train / RL state leaf at `path`: parameters, optimizer state, reference or other."""
    names = [str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", "")))) for k in path]
    if "opt_state" in names:
        return "optimizer state"
    if "reference" in names[:1]:
        return "reference"
    return "parameters" if "params" in names else "state (other)"


def _split_state(state) -> dict[str, Any]:
    """A train / RL state's arguments by kind (`_state_group`), each the state's own tree with the other
    kinds' leaves left out (None), so that its leaves keep their paths (the largest buffers name them)."""
    kinds = jax.tree_util.tree_map_with_path(lambda path, _: _state_group(path), state)
    groups = {}
    for kind in ("parameters", "optimizer state", "reference", "state (other)"):
        tree = jax.tree.map(lambda leaf, k: leaf if k == kind else None, state, kinds)
        if jax.tree.leaves(tree):
            groups[kind] = tree
    return groups


def _programs(config: RunConfig, program: Program, meshes, options):
    """Compile every program a run of `config` executes, on its `run_meshes`.

    Returns:
      The `ProgramReport`s, the resident bytes by kind, who uses what (program -> resident kinds) and
      where each resident kind lies (kind -> device ids).
    """
    from rlhf_jax.compile import compile_program, device_ids  # noqa: PLC0415

    mesh = meshes[0]
    state_abs = with_state(program)
    args = program.abstract_args()
    groups = {**_split_state(state_abs), "batch": args[1]}
    if program.frozen:
        groups["reference"] = list(program.frozen)
    family = recipe_for(config).name
    note = {"ppo": "with the old-policy log-prob and critic value passes before its epochs",
            "grpo": "with the old-policy log-prob pass before its epochs"}.get(family, "")
    reports = [compile_program("update step", lambda: program.step.lower(*args), groups, compiler_options=options,
                               note=note)]
    kept = {**_split_state(state_abs), **({"reference": list(program.frozen)} if program.frozen else {})}
    resident = {k: bytes_per_device(v) for k, v in kept.items()}
    places = {k: device_ids(v) for k, v in kept.items()}
    uses = {"update step": set(resident)}
    extra = {}
    if family in ("sft", "reward_model", "dpo"):
        reports_more, uses_more = _supervised_programs(config, program, mesh, state_abs, options)
    elif family in ONLINE_FAMILIES:
        reports_more, uses_more, extra = ONLINE_FAMILIES[family](config, program, meshes, state_abs, options)
    else:  # UNPLANNED names what these families run besides the update
        reports_more, uses_more = [], {}
    for kind, tree in extra.items():  # the sampler's weights, a reference, a reward model: they stay during the update
        resident[kind], places[kind] = bytes_per_device(tree), device_ids(tree)
    return reports + reports_more, resident, {**uses, **uses_more}, places


# What a run of these families executes that `plan_run` does not compile (its plan says so).
UNPLANNED = {
    "prm": "the held-out loss evaluation (data.eval)",
    "agentic_grpo": "the multi-turn sampler, the reference log-prob pass and reward-model scoring, and the sampler "
                    "weights they keep resident",
    "agentic_ppo": "the multi-turn sampler, the reference log-prob pass and reward-model scoring, and the sampler "
                   "weights they keep resident",
}


def with_state(program: Program):
    return with_shardings(program.state.abstract(), program.state.shardings())


def _supervised_programs(config, program: Program, mesh, state_abs, options):
    """SFT / reward model / DPO family: the held-out loss eval and DPO's reference log-prob pass."""
    from rlhf_jax.compile import compile_program  # noqa: PLC0415
    from rlhf_jax.train import dpo as dpo_mod, reward_model as rm_mod, sft as sft_mod, supervised  # noqa: PLC0415

    family = recipe_for(config).name
    model, strategy = program.parts["model"], config.mesh.strategy
    params = state_abs.params
    batch = {k: v for k, v in program.batch.items() if not k.startswith("ref_")}
    micro = config.train.micro_batches  # the run's eval and reference passes go in the update's pieces
    reports, uses = [], {}
    if family == "dpo":
        objective, segments = config.algorithm, dpo_mod.num_segments(config)
        # The reference the run passes: the frozen copy, or the policy's own (LoRA: its base) weights.
        reference = program.frozen[0] if program.frozen else (
            params if dpo_mod.lora_of(model) is None else dpo_mod.base_params(params))
        if objective.needs_reference:
            ref_fn = dpo_mod.make_reference_logps_fn(dpo_mod.reference_model(model), mesh=mesh, objective=objective,
                                                     strategy=strategy, max_segments=segments,
                                                     logits_chunk_size=config.logits_chunk_size, micro_batches=micro)
            when = "precomputed once before training" if config.reference == "precomputed" else "eval batches, once"
            reports.append(compile_program("reference log-probs", lambda: ref_fn.program.lower(reference, batch),
                                           {"reference": reference, "batch": batch}, compiler_options=options,
                                           note=when))
            uses["reference log-probs"] = {"reference"} if program.frozen else {"parameters"}
        if config.data.eval is not None:  # the held-out loss of pairs, or of KTO's unpaired examples
            evaluate = dpo_mod.make_preference_eval(model, objective, [], reference, mesh=mesh, strategy=strategy,
                                                    max_segments=segments, logits_chunk_size=config.logits_chunk_size,
                                                    micro_batches=micro)
            eval_batch = {**batch, **(dpo_mod._precomputed_shapes(config, mesh) if objective.needs_reference else {})}
            reports.append(compile_program("eval (held-out loss)", lambda: evaluate.program.lower(params, eval_batch),
                                           {"parameters": params, "batch": eval_batch}, compiler_options=options))
            uses["eval (held-out loss)"] = {"parameters"}
    elif config.data.eval is not None:
        if family == "sft":
            evaluate = sft_mod.make_sft_eval(model, [], mesh=mesh, strategy=strategy, micro_batches=micro)
        else:
            evaluate = rm_mod.make_reward_model_eval(
                model, [], mesh=mesh, strategy=strategy, max_segments=supervised.num_segments(config),
                micro_batches=micro, center_rewards_coefficient=config.algorithm.center_rewards_coefficient)
        reports.append(compile_program("eval (held-out loss)", lambda: evaluate.program.lower(params, batch),
                                       {"parameters": params, "batch": batch}, compiler_options=options))
        uses["eval (held-out loss)"] = {"parameters"}
    return reports, uses


def plan_run(config: RunConfig, *, target: Target | None = None, device_memory_bytes: int | None = None,
             compiler_options: dict[str, Any] | None = None) -> RunPlan:
    """Compile every program a run of `config` executes, for its mesh on `target`; the run's peak and fit.

    The run's peak per device is, over its programs, the program's own peak plus the buffers that
    stay allocated while it runs and are not among its arguments (the train state during an
    evaluation or the sampler's loop, the sampler's weights and a reward model during the update).
    The run fits when that peak is at most `target.memory_bytes` (what XLA can allocate per device
    there), or `device_memory_bytes` when given.
    """
    from rlhf_jax.plan_cache import cache_target  # noqa: PLC0415

    target = target or resolve_target(None)
    meshes = run_meshes(config, list(target.devices))
    program = recipe_for(config).build(config, meshes[0])
    with cache_target(target.label):
        reports, resident, uses, places = _programs(config, program, meshes, compiler_options)
    memory, source, memory_note = target.memory_bytes, target.memory_source, target.memory_note
    if device_memory_bytes is not None:
        memory, source, memory_note = device_memory_bytes, "given as device_memory_bytes", ""
    if any(not p.ok for p in reports):
        reports = _figures_from_proxy(config, target, reports, compiler_options)
    peak, where, totals = 0, "", {}
    for p in reports:
        own = p.peak_bytes if p.ok else max(p.required_bytes, p.peak_bytes, p.argument_bytes)
        # What stays allocated on the program's devices (an off-policy sampler's weights are on others).
        total = own + sum(v for k, v in resident.items() if k not in uses.get(p.name, set()) and k not in p.arguments
                          and (not p.devices or set(places[k]) & set(p.devices)))
        totals[p.name] = total
        if total > peak:
            peak, where = total, p.name
    fits = all(p.ok for p in reports) and (memory is None or peak <= memory)
    unplanned = UNPLANNED.get(recipe_for(config).name)
    trainer, sampler, sampler_strategy = meshes
    split = None if trainer is sampler else (
        f"trainer on {trainer.devices.size} devices {dict(trainer.shape)}, sampler on "
        f"{'the same' if set(trainer.devices.flat) == set(sampler.devices.flat) else 'its own'} "
        f"{sampler.devices.size} {dict(sampler.shape)} {sampler_strategy}")
    note = "; ".join(filter(None, (target.note, split, unplanned and f"update step only: not compiled: {unplanned}")))
    return RunPlan(config.name, target.label, memory, tuple(reports), resident, peak, where, fits, note=note,
                   program_peaks=totals, memory_source=source, memory_note=memory_note)


def _figures_from_proxy(config: RunConfig, target: Target, reports: list, options) -> list:
    """Memory figures of programs a TPU ran out of memory for, from the same programs on v5p chips.

    XLA:TPU stops at the first allocation that does not fit and says only how much it needed. The
    same mesh on as many v5p chips (95.74 GiB each for XLA) compiles, so its memory analysis and HLO give the
    split, the peak and the largest buffers (TPU generations lay buffers out alike; the verdict
    stays the target's).
    """
    from rlhf_jax.plan_cache import cache_target  # noqa: PLC0415
    from rlhf_jax.targets import _grid  # noqa: PLC0415

    n = len(target.devices)
    grid = _grid(n, 3) if target.platform == "tpu" and not target.label.startswith("v5p") else None
    if grid is None:
        return reports
    proxy_name = f"v5p:{'x'.join(map(str, grid))}"
    try:
        proxy = resolve_target(proxy_name)
        meshes = run_meshes(config, list(proxy.devices))
        with cache_target(proxy_name):
            proxied = _programs(config, recipe_for(config).build(config, meshes[0]), meshes, options)[0]
    except Exception:
        return reports
    by_name = {p.name: p for p in proxied}
    out = []
    for p in reports:
        q = by_name.get(p.name)
        if p.ok or q is None or not q.ok:
            out.append(p)
            continue
        need = f"; on {target.label} the compiler needed {p.required_bytes / 2**30:.2f} GiB" if p.required_bytes else ""
        out.append(dataclasses.replace(q, ok=False, error=p.error, required_bytes=p.required_bytes,
                                       note=f"figures from the same program compiled for {proxy_name}{need}"))
    return out


def format_plan(plan: RunPlan) -> str:
    """The plan as text: each program, the resident buffers, the run's peak and the verdict."""
    from rlhf_jax.compile import _size, format_program, memory_verdict  # noqa: PLC0415

    lines = [f"run {plan.name} on {plan.target}" + (f"  ({plan.note})" if plan.note else "")]
    lines += [format_program(p, plan.memory_bytes) for p in plan.programs]
    lines.append("resident between programs: " + ", ".join(f"{k} {_size(v)}" for k, v in plan.resident.items() if v))
    if plan.memory_bytes:
        note = f" ({plan.memory_note})" if plan.memory_note else ""
        lines.append(f"device memory: the {_size(plan.memory_bytes)} {plan.memory_source or 'per device'}{note}")
    share = f" = {plan.peak_bytes / plan.memory_bytes:.0%} of {_size(plan.memory_bytes)}" if plan.memory_bytes else ""
    lines.append(f"run peak per device: {_size(plan.peak_bytes)} during {plan.peak_program!r}{share}")
    failed = [p.name for p in plan.programs if not p.ok]
    memory = memory_verdict(plan.peak_bytes, plan.memory_bytes, plan.memory_source) if plan.memory_bytes else ""
    if plan.fits:
        lines.append("verdict: FITS" + (f" ({memory})" if memory else ""))
    else:
        why = f"{', '.join(failed)} did not compile" if failed else memory
        lines.append(f"verdict: DOES NOT FIT ({why})")
        worst = max(plan.programs, key=lambda p: p.peak_bytes if p.ok else p.required_bytes)
        lines += [f"  largest in {worst.name!r}: {_size(n)} {what} ({where})" for n, what, where in worst.largest[:5]]
    for knob, verdict in plan.suggestions:
        lines.append(f"  try --set {knob}: {verdict}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ suggestions


def _knobs(config: RunConfig, ways: int) -> list[str]:
    """Config changes that shrink the largest programs: remat, micro-batches, FSDP size, sampler batch, length."""
    knobs = []
    if getattr(config.model, "remat", "full") != "full":
        knobs.append("model.remat=full")
    rollout = getattr(config, "rollout", None)
    section = "algorithm" if rollout is not None else "train"  # RL updates split into the algorithm's micro-batches
    mesh, m, b = config.mesh, getattr(config, section).micro_batches, config.data.batch_size
    if b % (2 * m * ways) == 0:
        knobs.append(f"{section}.micro_batches={2 * m}")
    if mesh.strategy != "fsdp" or mesh.data != 1 or mesh.tensor != 1:
        knobs.append("mesh.strategy=fsdp mesh.data=1 mesh.fsdp=-1 mesh.tensor=1")
    if rollout is not None and b % (2 * ways) == 0:
        knobs.append(f"data.batch_size={b // 2}")
    if rollout is not None and rollout.max_new_tokens >= 64:
        knobs.append(f"rollout.max_new_tokens={rollout.max_new_tokens // 2}")
    elif getattr(config.data, "max_len", None) and config.data.max_len >= 128:
        knobs.append(f"data.max_len={config.data.max_len // 2}")
    return knobs


def suggest(config: RunConfig, plan: RunPlan, *, target: Target, compiler_options=None, limit: int = 3
            ) -> tuple[tuple[str, str], ...]:
    """Try each knob of `_knobs` (up to `limit`) by planning the changed config; `(knob, verdict)` pairs."""
    from rlhf_jax.compile import _size  # noqa: PLC0415
    from rlhf_jax.config import override  # noqa: PLC0415

    mesh = run_meshes(config, list(target.devices))[0]
    target = dataclasses.replace(target, memory_bytes=plan.memory_bytes, memory_source=plan.memory_source,
                                 memory_note=plan.memory_note)  # the plan's memory, however it was given
    out = []
    for knob in _knobs(config, sh.batch_axis_size(mesh, config.mesh.strategy))[:limit]:
        try:
            changed = override(config, knob.split())
            other = plan_run(changed, target=target, compiler_options=compiler_options)
        except (ConfigError, sh.ShardingError, ValueError) as e:
            out.append((knob, f"not applicable: {str(e).splitlines()[0]}"))
            continue
        share = f" ({other.peak_bytes / other.memory_bytes:.0%})" if other.memory_bytes else ""
        verdict = "fits" if other.fits else "still does not fit"
        out.append((knob, f"{verdict}, run peak {_size(other.peak_bytes)}{share} during {other.peak_program!r}"))
    return tuple(out)


# ----------------------------------------------------------------------------------------- command


def compile_command(experiment: str, *, sets=(), topology: str | None = None, device_memory_gib: float | None = None,
                    json_path: str | None = None, suggestions: int = 3, compiler_options=None) -> int:
    """`rlhf-jax compile experiments/NAME.py[:ARG]`: plan every run of the experiment; 0 fits, 3 not, 2 bad input.

    Raises:
      CLIError-like user errors (`ConfigError`, `ShardingError`, `TargetError`) for the CLI's one line.
    """
    import json  # noqa: PLC0415

    from rlhf_jax.cli import experiment_config, load_experiment  # noqa: PLC0415
    from rlhf_jax.compile import EXIT_DOES_NOT_FIT  # noqa: PLC0415

    target = with_device_memory_gib(resolve_target(topology), device_memory_gib)
    module, arg = load_experiment(experiment)
    config = experiment_config(module, arg, sets)
    runs = run_configs(config)
    for run in runs.values():  # every run's trainer mesh and batch split, before anything compiles
        mesh = run_meshes(run, list(target.devices))[0]
        ways = sh.batch_axis_size(mesh, run.mesh.strategy) * run.train.micro_batches
        if run.data.batch_size % ways:
            raise sh.ShardingError(
                f"{run.name}: data.batch_size {run.data.batch_size} is not divisible by the {ways} rows per step "
                f"the mesh {dict(mesh.shape)} on {target.label} splits it into (data-parallel ways x "
                f"train.micro_batches {run.train.micro_batches}); use a multiple of {ways} or fewer data axes")
    plans = {}
    for name, run in runs.items():
        plan = plan_run(run, target=target, compiler_options=compiler_options)
        if not plan.fits and suggestions:
            plan = dataclasses.replace(plan, suggestions=suggest(run, plan, target=target,
                                                                 compiler_options=compiler_options, limit=suggestions))
        print(f"== {name} ==\n{format_plan(plan)}", flush=True)
        plans[name] = plan
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump({k: p.to_dict() for k, p in plans.items()}, f, indent=2, default=str)
    return 0 if all(p.fits for p in plans.values()) else EXIT_DOES_NOT_FIT
