"""`rlhf-jax compile` plans: target names, bad input in one line, FLOPs of scanned layers, the plan against the run."""

import dataclasses
import importlib.util
import os

import jax
import pytest

from rlhf_jax import sharding as sh
from rlhf_jax.cli import main as cli_main
from rlhf_jax.compile import compile_program
from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
from rlhf_jax.hlo_analysis import Collective, analyze_hlo
from rlhf_jax.models import CausalLM
from rlhf_jax.optim import OptimizerConfig, make_optimizer
from rlhf_jax.state import abstract_train_state
from rlhf_jax.steps import SFT_KEYS, jit_model_step, make_sft_step
from rlhf_jax.targets import TargetError, parse_target_name
from rlhf_jax.testing import tiny_config
from rlhf_jax.train import dpo as dpo_mod, recipe_for, tiny_stages
from rlhf_jax.train.aot import format_plan, plan_run
from rlhf_jax.train.recipe import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = {"xla_backend_optimization_level": 0}


def test_target_names():
    cases = {"v5litepod-16": ("v5e:4x4", 16), "v5e-8": ("v5e:2x4", 8), "v6e-8": ("v6e:2x4", 8),
             "v5p-64": ("v5p:2x4x4", 32), "v5p-8": ("v5p:2x2x1", 4), "v4-8": ("v4:2x2x1", 4),
             "v5p-128": ("v5p:4x4x4", 64), "v5e:2x4": ("v5e:2x4", 8), "v5p:4x4x2": ("v5p:4x4x2", 32)}
    for name, (topology, chips) in cases.items():
        parsed = parse_target_name(name)
        assert (parsed.kind, parsed.topology, parsed.chips) == ("tpu", topology, chips), name
    assert (parse_target_name("H200-8").gpu, parse_target_name("h200-8").count) == ("h200", 8)
    for bad, why in {"v9-8": "v9-8", "v5p-6": "not a v5p slice size", "v5e:2x4x2": "has 2 sides",
                     "tpu": "accepted:", "v4:2x2": "has 3 sides"}.items():
        with pytest.raises(TargetError, match=why) as e:
            parse_target_name(bad)
        assert "\n" not in str(e.value) and "v5litepod-16" in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu's compile-only devices")
def test_every_accepted_tpu_generation_has_its_memory():
    """A target without a memory figure would plan as fitting whatever it needs (v2 and v3 had none).
    Each is what XLA:TPU can allocate per device (a TensorCore on v2-v4): tests/test_compile.py checks
    the figures against the compiler."""
    from rlhf_jax.targets import resolve_target

    per_device = {"v2:2x2": 7.48, "v3-8": 15.48, "v4-8": 15.25, "v5e:2x4": 15.75, "v5p-8": 95.74, "v6e-8": 31.25}
    for name, gib in per_device.items():
        assert round(resolve_target(name).memory_bytes / 2**30, 2) == gib, name


def test_gpu_memory_is_the_share_jax_lets_xla_allocate(monkeypatch):
    """JAX 0.10's allocator holds at most XLA_CLIENT_MEM_FRACTION (or XLA_PYTHON_CLIENT_MEM_FRACTION) of a
    GPU, 0.75 unset, preallocated or not; the platform allocator all of it. The plan used all of it."""
    from rlhf_jax.targets import GPU_MEMORY_BYTES, gpu_memory_fraction, resolve_target

    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
                 "XLA_PYTHON_CLIENT_ALLOCATOR"):
        monkeypatch.delenv(name, raising=False)
    h100 = GPU_MEMORY_BYTES["h100"]
    assert h100 == 81_559 * 2**20
    target = resolve_target("h100-1")  # the command's environment: nothing set
    assert target.memory_bytes == int(h100 * 0.75) == 64_140_607_488
    assert target.memory_source == "JAX lets XLA allocate on an H100"
    assert target.memory_note.startswith("75% of its 79.65 GiB, JAX's default with XLA_CLIENT_MEM_FRACTION unset; "
                                         "plan for another share with XLA_CLIENT_MEM_FRACTION=.XX")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".9")
    assert resolve_target("h100-1").memory_bytes == int(h100 * 0.9)
    cases = [({}, 0.75), ({"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, 0.75),  # grows to the same limit
             ({"XLA_CLIENT_MEM_FRACTION": "0.5", "XLA_PYTHON_CLIENT_PREALLOCATE": "0"}, 0.5),
             ({"XLA_CLIENT_MEM_FRACTION": "1.5"}, 1.0), ({"XLA_PYTHON_CLIENT_ALLOCATOR": "BFC"}, 0.75),
             ({"XLA_PYTHON_CLIENT_ALLOCATOR": "cuda_async", "XLA_CLIENT_MEM_FRACTION": ".6"}, 0.6),
             ({"XLA_PYTHON_CLIENT_ALLOCATOR": "platform", "XLA_CLIENT_MEM_FRACTION": ".6"}, 1.0)]
    for env, fraction in cases:
        assert gpu_memory_fraction(env)[0] == fraction, env
        assert resolve_target("h200-1", environ=env).memory_bytes == int(GPU_MEMORY_BYTES["h200"] * fraction), env
    assert "XLA_PYTHON_CLIENT_PREALLOCATE=false keeps that limit" in gpu_memory_fraction(cases[1][0])[1]
    for env, words in [({"XLA_CLIENT_MEM_FRACTION": ".8", "XLA_PYTHON_CLIENT_MEM_FRACTION": ".9"}, "both set"),
                       ({"XLA_CLIENT_MEM_FRACTION": "most"}, "XLA_CLIENT_MEM_FRACTION='most'"),
                       ({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0"}, "XLA_PYTHON_CLIENT_MEM_FRACTION='0'"),
                       ({"XLA_PYTHON_CLIENT_ALLOCATOR": "cuda"}, "XLA_PYTHON_CLIENT_ALLOCATOR='cuda'")]:
        with pytest.raises(TargetError, match=words):
            gpu_memory_fraction(env)


def test_plan_text_names_the_memory_its_verdict_uses(monkeypatch, capsys):
    """A run needing 70 GiB of an H100 under JAX's default share: "needs 70.00 GiB of the 59.74 GiB JAX lets
    XLA allocate", and which share that is and how to change it; --device-memory-gib wins over that share."""
    from rlhf_jax.compile import ProgramReport
    from rlhf_jax.targets import resolve_target, with_device_memory_gib
    from rlhf_jax.train.aot import RunPlan

    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
                 "XLA_PYTHON_CLIENT_ALLOCATOR"):
        monkeypatch.delenv(name, raising=False)

    def text(target, peak_gib):
        peak = int(peak_gib * 2**30)
        update = ProgramReport("update step", ok=True, peak_bytes=peak)
        return format_plan(RunPlan("run", target.label, target.memory_bytes, (update,), {}, peak, "update step",
                                   peak <= target.memory_bytes, memory_source=target.memory_source,
                                   memory_note=target.memory_note))

    h100 = resolve_target("h100-1")
    out = text(h100, 70)
    assert ("device memory: the 59.74 GiB JAX lets XLA allocate on an H100 (75% of its 79.65 GiB, JAX's default with "
            "XLA_CLIENT_MEM_FRACTION unset; plan for another share with XLA_CLIENT_MEM_FRACTION=.XX (or "
            "XLA_PYTHON_CLIENT_ALLOCATOR=platform for all of it) in this command's environment, as the run will have "
            "it, or pass --device-memory-gib)") in out
    assert "verdict: DOES NOT FIT (needs 70.00 GiB of the 59.74 GiB JAX lets XLA allocate on an H100)" in out
    given = with_device_memory_gib(h100, 80)
    assert (given.memory_bytes, given.memory_note) == (80 * 2**30, "") and with_device_memory_gib(h100, None) is h100
    out = text(given, 70)
    assert "device memory: the 80.00 GiB given by --device-memory-gib\n" in out
    assert "verdict: FITS (70.00 GiB of the 80.00 GiB given by --device-memory-gib, 88%)" in out
    # A setting JAX would refuse is bad input: one line, exit 2, before anything is planned.
    monkeypatch.setenv("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "most")  # parsed whichever the allocator
    assert cli_main(["compile", os.path.join(ROOT, "experiments", "sft_tiny.py"), "--topology", "h100-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "XLA_CLIENT_MEM_FRACTION='most' in the environment" in err, err


def test_bad_input_exits_2_with_one_line(capsys):
    dpo_tiny = os.path.join(ROOT, "experiments", "dpo_tiny.py")
    assert len(jax.devices()) == 8  # a running backend: a GPU plan cannot add devices to it (h100-16 below)
    for args, words in [(["--topology", "v5p-6"], ["v5p-6", "accepted:"]),
                        (["--topology", "h100-16"], ["needs 16 devices", "8"]),
                        (["--set", "dpo.data.batch_size=12"], ["data.batch_size 12", "not divisible", "multiple of 8"]),
                        (["--set", "dpo.nonsense=1"], ["nonsense"])]:
        assert cli_main(["compile", dpo_tiny, *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert all(w in err for w in words), (args, err)
        if "nonsense" not in args[-1]:
            assert len(err.splitlines()) == 1, err


def _sft_flops(scan: bool):
    config = tiny_config().replace(scan_layers=scan, num_layers=4)
    model, optim = CausalLM(config), OptimizerConfig(learning_rate=1e-3)
    mesh = sh.make_mesh({"fsdp": 2}, devices=jax.devices()[:2])
    step = jit_model_step(make_sft_step(model, optim), model, optim, mesh=mesh, strategy="fsdp", batch_keys=SFT_KEYS)
    state = abstract_train_state(model.init, make_optimizer(optim))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, step.state_shardings)
    tok = jax.ShapeDtypeStruct((4, 32), jax.numpy.int32, sharding=sh.batch_sharding(mesh, "fsdp"))
    batch = {"tokens": tok, "loss_mask": tok}
    return compile_program("sft", lambda: step.lower(state, batch), {"state": state, "batch": batch},
                           compiler_options=FAST)


def test_flops_of_scanned_layers_match_the_unrolled_compile():
    scanned, unrolled = _sft_flops(True), _sft_flops(False)
    # XLA's own count visits the layer loop's body once; the HLO count runs it num_layers times.
    assert scanned.xla_flops < 0.7 * unrolled.xla_flops
    assert scanned.flops == pytest.approx(unrolled.xla_flops, rel=0.02)
    # No layer loop: XLA's figure, plus the trips of XLA:CPU's scatter loops (inside `call`s) past the first.
    assert unrolled.xla_flops <= unrolled.flops == pytest.approx(unrolled.xla_flops, rel=1e-3)
    # FSDP over 2 devices: parameters gathered (all-gather) and gradients reduced, in both programs alike.
    assert scanned.collectives["all-gather"] == unrolled.collectives["all-gather"] > 0
    assert scanned.collectives["total"] == pytest.approx(unrolled.collectives["total"], rel=0.02)
    assert scanned.arguments["state"] > 0 and scanned.peak_bytes >= scanned.argument_bytes


def _counting_loop(n: int, body_name: str, body: str, entry: str = "") -> str:
    """An HLO module running `body` (over `(s32[] i, f32[8] x)`, given as its instruction lines) while
    `i < n`, from `i = 0`; `entry`: more lines of the entry computation."""
    return f"""HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {{
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant({n})
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}}

%{body_name} (q: (s32[], f32[8])) -> (s32[], f32[8]) {{
  %q = (s32[], f32[8]) parameter(0)
{body}
}}

ENTRY %main (a: f32[8]) -> f32[8] {{
  %a = f32[8] parameter(0)
  %c = s32[] constant(0)
  %t0 = (s32[], f32[8]) tuple(%c, %a)
  %w = (s32[], f32[8]) while(%t0), condition=%cond, body=%{body_name}
{entry}
  ROOT %r = f32[8] get-tuple-element(%w), index=1
}}
"""


def test_hlo_analysis_counts_loops_by_their_condition_and_tpu_windowed_collectives():
    text = _counting_loop(6, "windowed_dot_general_body_rs.1", """\
  %x = f32[8] get-tuple-element(%q), index=1
  %cp = (f32[8], f32[8], u32[], u32[]) collective-permute-start(%x), source_target_pairs={{0,1}}
  %y = f32[8] collective-permute-done(%cp)
  %z = f32[8] add(%y, %x)
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %t = (s32[], f32[8]) tuple(%j, %z)""", entry="""  %ag = f32[16] all-gather(%a), dimensions={0}
  %ar = (f32[2,64]{1,0:T(8,128)}, f32[64]{0}) all-reduce(%a, %ag), to_apply=%add""")
    stats = analyze_hlo(text)
    assert stats.loop_trips == {"windowed_dot_general_body_rs.1": 6}
    assert stats.flops == 6 * 8 + 1  # the add once per trip, the condition's compare once (as XLA counts it)
    # The async permute pair counts once, by its result; a TPU layout's parentheses stay inside the tuple.
    assert stats.collective_ops == (
        Collective("all-gather", "f32[16]", 64, 1),
        Collective("all-reduce", "(f32[2,64]{1,0:T(8,128)}, f32[64]{0})", 768, 1),
        Collective("reduce-scatter", "f32[8]", 32, 6))
    assert stats.collectives == {"all-gather": 64, "all-reduce": 768, "reduce-scatter": 6 * 32, "total": 6 * 32 + 832}


def test_hlo_analysis_loop_step_is_the_increment_carried_to_the_next_trip():
    """XLA:TPU's windowed-einsum loops step their counter by 2 and also add 1 to it for the next shard's
    index; the counter reaches the add through a copy, and the body's root is not its last line.
    `i < 8` stepping by 2 runs 4 trips, not 8."""
    text = _counting_loop(8, "windowed_dot_general_body_ag.1", """\
  %j = s32[] get-tuple-element(%q), index=0
  %jc = s32[] copy(%j)
  %one = s32[] constant(1)
  %two = s32[] constant(2)
  ROOT %t = (s32[], f32[8]) tuple(%next, %z)
  %shard = s32[] add(%jc, %one)
  %x = f32[8] get-tuple-element(%q), index=1
  %z = f32[8] multiply(%x, %x)
  %next = s32[] add(%jc, %two)""")
    stats = analyze_hlo(text)
    assert stats.loop_trips == {"windowed_dot_general_body_ag.1": 4}
    assert stats.flops == 4 * (8 + 2) + 1  # the multiply and both adds per trip, the condition once


def test_plan_peak_matches_the_programs_the_run_compiles(tmp_path, monkeypatch):
    """The plan of a tiny DPO run (update, reference pass, held-out eval) against the run's own executables."""
    config = tiny_stages.vowel_dpo("plan_vs_run", steps=1)
    config = dataclasses.replace(
        config, workdir=str(tmp_path / "dpo"), data=dataclasses.replace(config.data, batch_size=8, num_train=32,
                                                                        num_eval=8),
        train=TrainConfig(steps=1, eval_every=1, eval_batches=1),
        checkpoint=CheckpointConfig(every=0, async_save=False), logging=LoggingConfig(console=False, tensorboard=False),
        sampling=dpo_mod.SampleEvalConfig(num_prompts=0))
    plan = plan_run(config, compiler_options=FAST)
    names = [p.name for p in plan.programs]
    assert names == ["update step", "reference log-probs", "eval (held-out loss)"], names
    assert all(p.ok for p in plan.programs) and plan.fits
    text = format_plan(plan)
    assert "verdict: FITS" in text and "optimizer state" in text and "reference" in text

    # The run: capture its update step's arguments and its eval program with the batches it evaluates.
    seen = {}
    recipe = recipe_for(config)

    def build(cfg, mesh):
        program = recipe.build(cfg, mesh)
        step = program.step

        class Capture(type(step)):
            def __call__(self, state, batch, *frozen):
                seen.setdefault("update", jax.tree.map(
                    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), (state, batch, *frozen)))
                return super().__call__(state, batch, *frozen)

        fields = {f.name: getattr(step, f.name) for f in dataclasses.fields(step)}
        return dataclasses.replace(program, step=Capture(**fields))

    real_eval = dpo_mod.make_weighted_eval

    def capture_eval(*args, **kwargs):
        seen["eval"] = evaluate = real_eval(*args, **kwargs)
        return evaluate

    monkeypatch.setattr(dpo_mod, "make_weighted_eval", capture_eval)
    run(dataclasses.replace(recipe, build=build), config)
    state, batch, reference = seen["update"]
    update = plan.programs[0]
    compiled = recipe.build(config, sh.make_mesh(config.mesh.shape)).step.jitted.lower(state, batch, reference)
    run_update = _peak(compiled.compile(compiler_options=FAST))
    evaluate = seen["eval"]
    run_eval = _peak(evaluate.program.lower(state.params, evaluate.batches[0]).compile(compiler_options=FAST))
    assert update.peak_bytes == pytest.approx(run_update, rel=0.05)
    assert plan.programs[2].peak_bytes == pytest.approx(run_eval, rel=0.05)
    resident = sum(plan.resident.values())
    run_peak = max(run_update, run_eval + resident - plan.resident.get("parameters", 0))
    assert plan.peak_bytes == pytest.approx(run_peak, rel=0.05)


def _peak(compiled) -> int:
    m = compiled.memory_analysis()
    live = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return max(int(getattr(m, "peak_memory_in_bytes", 0) or 0), int(live))


def test_a_bad_target_name_fails_in_one_line_before_jax_starts_a_backend():
    """`python -m rlhf_jax compile ... --topology v9z:2x2`: exit 2, one stderr line, no libtpu start-up, < 10 s.

    Time as the child's CPU seconds (user + system; ~1.4 s, the jax import): wall time on a shared
    host measures the other processes too.
    """
    import resource  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import time  # noqa: PLC0415

    def cpu():
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    start, wall = cpu(), time.monotonic()
    done = subprocess.run([sys.executable, "-m", "rlhf_jax", "compile", "experiments/dpo_qwen2_5_0_5b.py",
                           "--topology", "v9z:2x2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    seconds, wall = cpu() - start, time.monotonic() - wall
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.splitlines() == [done.stderr.strip()] and "'v9z:2x2'" in done.stderr, done.stderr
    assert "v5litepod-16" in done.stderr and seconds < 10, (seconds, wall, done.stderr)


def test_plan_cache_key_ignores_the_program_name_only():
    """A program's key is its module without its name (a sampler's programs carry a per-process instance number)."""
    from rlhf_jax.plan_cache import program_key  # noqa: PLC0415

    def body(x):
        return jax.numpy.sin(x) @ x

    def other(x):
        return jax.numpy.cos(x) @ x

    def lowered(fn, name):
        fn.__name__ = name
        return jax.jit(fn).lower(jax.numpy.ones((3, 3))).as_text()

    texts = {name: lowered(fn, name) for name, fn in (("rlhf_jax_sampler3_prefill", body),
                                                       ("rlhf_jax_sampler7_prefill", body), ("other", other))}
    assert "module @jit_rlhf_jax_sampler3_prefill" in texts["rlhf_jax_sampler3_prefill"]
    keys = {name: program_key(t, target="v5e:2x4") for name, t in texts.items()}
    assert keys["rlhf_jax_sampler3_prefill"] == keys["rlhf_jax_sampler7_prefill"] != keys["other"]
    assert program_key(texts["other"], target="v5e:2x4") != program_key(texts["other"], target="v5p:2x2x1")
    assert program_key(texts["other"], target="v5e:2x4", compiler_options={"xla_tpu_x": "1"}) != keys["other"]


def test_a_corrupt_plan_cache_file_is_named(tmp_path):
    from rlhf_jax.plan_cache import PlanCache, use_plan_cache  # noqa: PLC0415

    bad = tmp_path / "plans.json"
    bad.write_text('{"abc": {"ok": tru')
    with pytest.raises(ValueError, match=r"plan cache '.*plans.json' is not valid JSON"):
        PlanCache.load(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"must hold a JSON object .* got list"):
        with use_plan_cache(str(bad)):
            raise AssertionError("entering the cache's context must already have failed")
    assert PlanCache.load(str(tmp_path / "missing.json")).entries == {}  # no file yet: an empty cache


def test_plan_argument_split_sizes_the_state_and_names_its_leaves():
    """The update step's argument split (parameters / optimizer state) equals the state's pytree sizes, and
    its largest arguments keep their paths: they read `parameters[7]` (a flattened list's index) before."""
    from rlhf_jax.compile import bytes_per_device, largest_leaves  # noqa: PLC0415
    from rlhf_jax.train.aot import _split_state, with_state  # noqa: PLC0415
    from rlhf_jax.train.sft import SFTConfig  # noqa: PLC0415

    model = tiny_config(num_layers=2, intermediate_size=256)
    config = SFTConfig(name="split", model=model)
    program = recipe_for(config).build(config, sh.make_mesh(config.mesh.shape, devices=jax.devices()[:1]))
    groups = _split_state(with_state(program))
    c = model
    per_layer = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                 + c.num_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
                 + 2 * c.hidden_size)  # q, k, v, o, gate / up / down, two norms
    n = c.num_layers * per_layer + c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2) + c.hidden_size
    assert bytes_per_device(groups["parameters"]) == 4 * n
    # AdamW's mu and nu, and its int32 step counts
    assert bytes_per_device(groups["optimizer state"]) == pytest.approx(2 * 4 * n, abs=16)
    top = largest_leaves(groups, top=2)
    assert [n for n, _, _ in top] == [4 * c.num_layers * c.hidden_size * c.intermediate_size] * 2, top
    assert all("['layers']['mlp']" in path and path.startswith(("parameters.", "optimizer state."))
               for _, path, _ in top), top


def test_every_family_plans_its_programs_or_says_what_it_leaves_out():
    """A family whose sampler / evaluation programs `plan_run` does not compile says so in its plan (before,
    `rlhf-jax compile experiments/online_dpo_tiny.py` showed the update alone and read FITS, silent about the
    sampler, the reference pass and the resident reference copy)."""
    import importlib  # noqa: PLC0415

    from rlhf_jax.train import RECIPE_MODULES  # noqa: PLC0415
    from rlhf_jax.train.aot import UNPLANNED  # noqa: PLC0415

    names = {getattr(importlib.import_module(m), a).name for m, a in RECIPE_MODULES.values()}
    planned = {"sft", "reward_model", "dpo", "grpo", "ppo", "rejection_sampling", "online_dpo"}  # and their other programs
    assert names - planned == set(UNPLANNED), (names, sorted(UNPLANNED))


def _tiny_rl_model():
    return tiny_config(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=2, head_dim=16)


def test_off_policy_run_is_planned_on_the_trainer_and_sampler_devices_it_runs_on():
    """`off_policy.sampler_devices=2` with a tensor-parallel `sampler_mesh`: the run trains on 6 of the 8 devices
    and samples on the other 2 (`rl._trainer_mesh` / `rl._sampler_mesh`). Before, the plan laid every program over
    all 8 with the trainer's data-parallel layout (8 prompts padded for 8 rows, no host copy in the hand-off)."""
    from rlhf_jax.data.synthetic import ArithmeticTask  # noqa: PLC0415
    from rlhf_jax.sharding import MeshConfig  # noqa: PLC0415
    from rlhf_jax.steps import grpo_config  # noqa: PLC0415
    from rlhf_jax.train import rl  # noqa: PLC0415
    from rlhf_jax.train.off_policy import OffPolicyConfig  # noqa: PLC0415
    from rlhf_jax.train.run_config import DataConfig  # noqa: PLC0415

    config = rl.GRPORunConfig(
        name="off", model=_tiny_rl_model(), mesh=MeshConfig(data=-1, strategy="dp"),
        data=DataConfig(train="synthetic:arithmetic", num_train=64, max_len=16, batch_size=6,
                        arithmetic=ArithmeticTask(max_operand=9)),
        algorithm=grpo_config("grpo", group_size=4, tis_cap=2.0), rollout=rl.RolloutConfig(max_new_tokens=4),
        off_policy=OffPolicyConfig(enabled=True, sampler_devices=2,
                                   sampler_mesh=MeshConfig(data=1, tensor=-1, strategy="tp")))
    plan = plan_run(config, compiler_options=FAST)
    trainer = rl._trainer_mesh(config)
    sampler = rl._sampler_mesh(config, trainer)[0]
    on = {p.name: p.devices for p in plan.programs}
    assert all(p.ok for p in plan.programs) and len(on) == 5, on
    ids = lambda mesh: tuple(sorted(d.id for d in mesh.devices.flat))  # noqa: E731
    assert ids(trainer) == (0, 1, 2, 3, 4, 5) and ids(sampler) == (6, 7)
    assert on["update step"] == on["reference log-probs"] == ids(trainer)
    assert on["sampler prefill"] == on["sampler decode loop"] == ids(sampler)
    # 6 trainer devices to 2 sampler devices: the weights go through the host, then the hand-off runs there.
    handoff = plan.programs[1]
    assert handoff.devices == ids(sampler) and "through the host" in handoff.note
    assert plan.programs[2].note.startswith("6 prompts x 4 samples")  # one data row on the sampler: no padding
    # The sampler's weights are not on the trainer's devices, nor the train state on the sampler's.
    update, decode = plan.programs[0], plan.programs[3]
    assert plan.resident["sampler weights"] > 0
    assert plan.program_peaks["update step"] == update.peak_bytes
    assert plan.program_peaks["sampler decode loop"] == decode.peak_bytes
    assert "trainer on 6 devices" in plan.note and "sampler on its own 2" in plan.note
    # Tensor parallel over 2: each sampler device holds about half of the (float32) weights.
    assert plan.resident["sampler weights"] < 0.6 * plan.resident["parameters"]


def test_best_of_n_and_online_dpo_plan_their_sampler_scoring_and_log_prob_passes():
    """Best-of-n and online DPO plan the programs their runs jit besides the update (before: the update alone)."""
    from rlhf_jax.rewards.registry import RewardConfig  # noqa: PLC0415
    from rlhf_jax.train.online_dpo import OnlineDPO, OnlineDPOConfig  # noqa: PLC0415
    from rlhf_jax.train.rejection_sampling import BestOfNConfig, RejectionSamplingConfig  # noqa: PLC0415
    from rlhf_jax.train.rollouts import RolloutConfig  # noqa: PLC0415
    from rlhf_jax.train.run_config import DataConfig  # noqa: PLC0415

    data = DataConfig(train="synthetic:vowel", max_len=16, batch_size=8)
    common = dict(model=_tiny_rl_model(), data=data, rollout=RolloutConfig(max_new_tokens=4))
    sampler = ["update step", "weight hand-off (trainer -> sampler layout)", "sampler prefill", "sampler decode loop"]
    bon = RejectionSamplingConfig(name="bon", algorithm=BestOfNConfig(samples_per_prompt=3), **common,
                                  rewards=RewardConfig(functions=("reward_model",), reward_model="rm"))
    plan = plan_run(bon, compiler_options=FAST)
    assert [p.name for p in plan.programs] == sampler + ["reward-model scoring"] and plan.fits
    assert plan.programs[2].note.startswith("8 prompts x 3 samples, prompt 16 + 4")
    assert set(plan.resident) >= {"parameters", "optimizer state", "sampler weights", "reward model"}
    assert "not compiled" not in plan.note
    # The reward model stays allocated during the update: the update's run memory counts it.
    assert plan.program_peaks["update step"] >= plan.programs[0].peak_bytes + plan.resident["reward model"]

    online = OnlineDPOConfig(name="odpo", algorithm=OnlineDPO(temperature=0.7), **common,
                             rewards=RewardConfig(functions=("task",)))
    plan = plan_run(online, compiler_options=FAST)
    names = [p.name for p in plan.programs]
    assert names == sampler + ["reference log-probs", "policy log-probs"] and plan.fits, names
    assert plan.programs[2].note.startswith("8 prompts x 2 samples")
    ref = plan.programs[4]
    # The reference pass reads the 16 sampled rows (int32 prompt [16, 16], lengths [16], completions [16, 4])
    # on every device (host arrays), and the reference copy of the weights stays resident.
    assert ref.arguments["batch"] == 4 * (16 * 16 + 16 + 16 * 4)
    assert plan.resident["reference"] == plan.resident["parameters"] > 0
    assert plan.program_peaks["update step"] >= plan.programs[0].peak_bytes + plan.resident["reference"]
