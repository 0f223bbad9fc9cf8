"""benchmarks/bench_accelerator.py at `--smoke` size on the CPU: both workers run, the JAX and torch
SFT losses at step 1 agree (same weights, same batch), every part reports finite figures, the table is
printed last; and the run imports nothing the device image lacks (those packages are made unimportable)."""

import importlib.util
import json
import os
import subprocess
import sys

from multihost import environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "bench_accelerator.py")
# install_requires / extras that the H200 image (Python 3.12, JAX 0.11 CUDA, flax, optax, orbax, torch,
# transformers, peft, chex) does not have: see benchmarks/ACCELERATORS.md.
ABSENT_ON_DEVICE = ("tensorflow_datasets", "tensorflow", "array_record", "datasets", "importlib_resources",
                    "tensorboardX", "qwix", "math_verify")
# As if not installed: `import x` raises ModuleNotFoundError and importlib.util.find_spec("x") is None
# (libraries probe optional packages that way, e.g. accelerate for tensorboardX).
BLOCKER = f"""
import importlib.abc, importlib.util, sys
ABSENT = {ABSENT_ON_DEVICE!r}
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError("absent on the device image: " + name, name=name)
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split(".")[0] in ABSENT else _find_spec(name, package))
sys.meta_path.insert(0, _Absent())
"""


def _load():
    sys.path.insert(0, os.path.dirname(BENCH))
    spec = importlib.util.spec_from_file_location("bench_accelerator", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_floor_bytes_by_hand():
    bench = _load()
    config = bench.model_config(smoke=False)
    # Qwen2.5-1.5B: 28 layers x (k, v) x 2 KV heads x 128 x 2 bytes = 28,672 bytes per cached token.
    got = bench._decode_floor_bytes(config, 1_543_714_304, rows=64, prompt_len=512, new_tokens=512)
    kv = 64 * 28_672 * sum(512 + i for i in range(1, 512))
    assert got == 511 * 1_543_714_304 * 2 + kv
    assert round(got / 1e9) == 2_298   # 1,578 GB of weights + 720 GB of KV over the 511 steps


def test_fit_step_takes_the_least_remat_that_fits():
    """No remat while the compiled step fits the limit; under it, "dots" (smaller by XLA's own analysis)
    computing the same loss."""
    import jax
    import numpy as np

    from rlhf_jax.models import CausalLM
    from rlhf_jax.steps import SFT_KEYS, jit_model_step, make_sft_step

    bench = _load()
    lm, opt = CausalLM(bench.model_config(smoke=True)), bench._opt_config()
    mesh, state = bench._train_setup(lm, opt, jax.jit(bench._init_fn(lm))(jax.random.key(0)))
    tokens = bench.tokens_rng((2, 32), lm.config.vocab_size, seed=1)
    batch = {"tokens": tokens, "loss_mask": np.ones_like(tokens)}

    def make_step(model):
        return jit_model_step(make_sft_step(model, opt), model, opt, batch_keys=SFT_KEYS, mesh=mesh, strategy="dp")

    plain, remat, need = bench.fit_step(make_step, lm, (state, batch), limit=None)
    assert remat == "none"
    fitted, remat_tight, need_tight = bench.fit_step(make_step, lm, (state, batch), limit=need - 1)
    assert remat_tight == "dots" and need_tight < need
    losses = [float(step(jax.tree.map(lambda x: x.copy(), state), batch)[1]["loss"]) for step in (plain, fitted)]
    assert losses[0] == losses[1]


def test_train_state_starts_from_the_worker_weights():
    """The SFT and DPO train states hold the very weights the worker saves for torch (and DPO's frozen
    reference): a state drawn afresh from the same key went through `init_train_state`'s fold_in and
    held other weights, which the step-1 loss check (a random model's loss is near ln(vocab) for any
    weights) did not notice."""
    import jax
    import numpy as np

    from rlhf_jax.models import CausalLM

    bench = _load()
    lm = CausalLM(bench.model_config(smoke=True))
    params = jax.jit(bench._init_fn(lm))(jax.random.key(0))
    _, state = bench._train_setup(lm, bench._opt_config(), params)
    for mine, theirs in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True):
        assert mine is not theirs   # a copy: the step donates its state, `params` stays usable
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))


def test_resident_bytes_leave_out_the_step_arguments():
    import jax.numpy as jnp

    bench = _load()
    before = bench._resident_bytes(())
    kept, arg = jnp.ones((1000,), jnp.float32), jnp.ones((500,), jnp.float32)
    assert bench._resident_bytes(({"a": arg}, 3)) - before == 4000
    assert bench._resident_bytes(()) - before == 6000
    del kept


# Makes the JAX worker die (as on a device fault) in the decode part, after the SFT part has finished.
CRASH_IN_DECODE = """
import os, numpy
_save = numpy.save
def _dying_save(file, *args, **kwargs):
    if "decode_tokens" in str(file):
        os._exit(7)
    return _save(file, *args, **kwargs)
numpy.save = _dying_save
"""


def test_a_dead_worker_keeps_its_finished_rows(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CRASH_IN_DECODE)
    env = {**environment(devices=1), "PYTHONPATH": os.pathsep.join([str(site), ROOT])}
    out_file = tmp_path / "accel.json"
    proc = subprocess.run([sys.executable, BENCH, "--smoke", "--parts", "sft,decode", "--out", str(out_file)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out_file.read_text())
    rows = result["jax"]["rows"]
    assert rows["sft"]["step_s"] > 0 and rows["sft"]["losses_finite"]
    assert rows["decode"]["error"].startswith("jax worker died: benchmark worker failed (exit 7)")
    assert list(result["summary"]["errors"]) == ["jax/decode"]
    assert sorted(os.listdir(tmp_path)) == ["accel.json", "site"]   # no partial file left
    assert proc.stdout.strip().splitlines()[-2].startswith("ERROR jax/decode: jax worker died")


def test_smoke_run(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    parts = "sft,dpo,decode,grpo,torch"
    # One CPU device, as the one chip the benchmark is written for (the GRPO run uses every device it sees).
    env = {**environment(devices=1), "PYTHONPATH": os.pathsep.join([str(site), ROOT])}
    out_file = tmp_path / "accel.json"
    proc = subprocess.run([sys.executable, BENCH, "--smoke", "--parts", parts, "--out", str(out_file)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out_file.read_text())
    summary, jax_rows, torch_rows = result["summary"], result["jax"]["rows"], result["torch"]["rows"]
    assert summary["errors"] == {} and summary["all_finite"]
    assert set(jax_rows) == set(parts.split(",")) - {"torch"} and set(torch_rows) == {"sft", "decode"}
    # Same bf16-valued weights and tokens, bf16 compute in both: losses agree far inside bf16 tolerance
    # (other weights of the same init gave 6e-4), and so do torch's log-probs of the JAX samples.
    assert summary["sft_loss_rel_diff"] < 1e-4 and summary["sft_losses_equal"]
    assert summary["decode_logprobs_agree"] and summary["decode_logprob_mean_abs_diff"] < 0.01
    assert torch_rows["decode"]["jax_logprob_std"] > 0.1 and torch_rows["decode"]["logprobs_finite"]
    assert 4.5 < jax_rows["sft"]["loss_step1"] < 6.5   # ≈ ln(256) for a random model over 256 ids
    assert jax_rows["decode"]["tokens_shape"] == [4, 8] and torch_rows["decode"]["shape"] == [4, 16]
    for row in (jax_rows["sft"], jax_rows["dpo"], torch_rows["sft"]):
        assert row["step_s"] > 0
    assert result["jax"]["peak_bf16_tflops"] > 0 and result["jax"]["copy_gbps"] > 0
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("checks: SFT loss@1 rel diff") and lines[-7].startswith("cpu (cpu), jax")
    # GRPO runs last, in a JAX worker of its own, after the torch baseline; no partial files are left.
    workers = [line.split(" worker: ")[0] for line in lines if " worker: {" in line]
    assert workers == ["jax", "torch", "jax_grpo"]
    assert sorted(os.listdir(tmp_path)) == ["accel.json", "site"]
