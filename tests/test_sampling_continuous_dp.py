"""Data-parallel continuous batching (`DataParallelBatcher`): one engine per data-parallel group of
the sampler's mesh, one shared arrival-order queue; outputs equal the one-device batcher's."""

import jax
import numpy as np
import pytest

from rlhf_jax import sharding as shd
from rlhf_jax.models import CausalLM
from rlhf_jax.sampling import Greedy, Request, Sampler, TopK, TopP
from rlhf_jax.sampling.data_parallel import DataParallelBatcher
from rlhf_jax.testing import tiny_config

rng = np.random.default_rng(5)
PROMPTS = [rng.integers(4, 250, size=int(n)).tolist() for n in (7, 2, 5, 11, 3, 8, 6, 4, 9, 1)]
LENGTHS = [14, 3, 9, 1, 12, 6, 14, 2, 5, 10]
METHODS = [Greedy(), TopP(p=0.9, temperature=0.8), TopK(k=20)]
# Blocks of 8: no group shares a full prompt block, so each engine compiles one segment program.
OPTS = dict(num_slots=3, block_size=8, num_blocks=12, methods="all")
BUCKETS = (16,)


def _requests():
    # Ragged lengths, mixed methods, a group of 2, seeds given or derived from the call's rng.
    return [Request(prompt=p, max_new_tokens=n, method=METHODS[i % 3], num_samples=1 + (i % 4 == 1),
                    seed=None if i % 2 else 100 + i) for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS))]


MODEL = tiny_config(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def lm():
    return CausalLM(MODEL)


@pytest.fixture(scope="module")
def params(lm):
    return lm.init(jax.random.key(0))


@pytest.fixture(scope="module")
def single(lm, params):
    """The one-device sampler and its batcher's outputs (the reference)."""
    sampler = Sampler(lm, max_len=32, prompt_buckets=BUCKETS)
    sp = sampler.load_params(params)
    return sampler, sp, sampler.generate_requests(sp, _requests(), rng=7, **OPTS)


def _assert_equal(outs, ref):
    assert len(outs) == len(ref)
    for i, (o, r) in enumerate(zip(outs, ref)):
        assert o.finish_reasons == r.finish_reasons, i
        for a, b, la, lb in zip(o.tokens, r.tokens, o.logprobs, r.logprobs):
            np.testing.assert_array_equal(a, b, err_msg=f"request {i}")
            np.testing.assert_allclose(la, lb, atol=1e-5, err_msg=f"request {i}")


@pytest.mark.parametrize("shape,strategy,engines", [({"data": 4}, "dp", 4), ({"data": 2, "tensor": 2}, "tp", 2)])
def test_engines_equal_one_device_batcher(lm, params, single, shape, strategy, engines):
    """Ragged per-request lengths, greedy and seeded sampling: each request's tokens equal the
    one-device batcher's (log-probs within 1e-5) whichever engine served it; every engine served some."""
    mesh = shd.make_mesh(shape, devices=jax.devices()[:4])
    sampler = Sampler(lm, max_len=32, prompt_buckets=BUCKETS, mesh=mesh, strategy=strategy)
    # (an iterator of requests: `_check` used to consume it, leaving the engines an empty queue)
    outs = sampler.generate_requests(params, iter(_requests()), rng=7, **OPTS)
    _assert_equal(outs, single[2])
    batcher = sampler.continuous_batcher(**OPTS)
    assert isinstance(batcher, DataParallelBatcher) and len(batcher.engines) == engines
    assert [m.devices.size for m in batcher.meshes] == [4 // engines] * engines
    assert {d for m in batcher.meshes for d in m.devices.flat} == set(mesh.devices.flat)
    assert all(e.stats.admissions > 0 for e in batcher.engines)
    assert sampler.continuous_stats().admissions == sum(e.stats.admissions for e in batcher.engines)
    if strategy == "tp":
        # The engine's pool keeps its kv heads split over the tensor axis (as the static call's cache)
        # through admission and decoding; the rest of the slot state is replicated.
        session = batcher.engines[0].session(batcher.engine_params(params)[0], rng=7)
        session.submit(_requests()[0])
        session.advance()
        pool, tokens = session._state.pool_k[0], session._state.out_tokens
        assert pool.sharding.spec == jax.sharding.PartitionSpec("tensor")
        assert [sh.data.shape[0] for sh in pool.addressable_shards] == [MODEL.num_kv_heads // 2] * 2
        assert tokens.sharding.is_fully_replicated
        return
    # The incremental form: requests submitted while the engines decode come back the same.
    session, requests, got = batcher.session(params, rng=7), _requests(), {}
    for req in requests[:4]:
        session.submit(req)
    got.update(session.advance())
    assert session.running > 0 and sum(s.running > 0 for s in session.sessions) > 1   # engines busy at once
    for req in requests[4:]:
        session.submit(req)
    while not session.idle:
        got.update(session.advance())
    _assert_equal([got[i] for i in range(len(requests))], single[2])
    # Each engine's weights lie on its own devices, with the sampler's within-group layout.
    trees = batcher.engine_params(sampler.load_params(params))
    for m, tree in zip(batcher.meshes, trees):
        assert all(set(a.sharding.device_set) == set(m.devices.flat) for a in jax.tree.leaves(tree.tree))
        q = tree.tree["layers"][0]["attn"]["q_proj"]
        assert q.sharding.spec == sampler.load_params(params).tree["layers"][0]["attn"]["q_proj"].sharding.spec
        assert (q.sharding.spec != jax.sharding.PartitionSpec()) == (strategy == "tp")


def test_grpo_collector_uses_the_engines_and_equals_the_one_device_path(tmp_path):
    """A GRPO run's collector (`rl.rollout_parts`) with rollout.continuous_slots on a 2-device dp
    sampler mesh samples through the data-parallel engines; the step's rollouts (groups of 4 with
    the task's EOS, rewards scored) equal those of the one-device continuous path."""
    import copy

    from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
    from rlhf_jax.data.synthetic import ArithmeticTask
    from rlhf_jax.sharding import MeshConfig
    from rlhf_jax.steps import grpo_config
    from rlhf_jax.train import rl
    from rlhf_jax.train.data import load_run_data, train_batches
    from rlhf_jax.train.run_config import DataConfig

    config = rl.GRPORunConfig(
        name="dp", workdir=str(tmp_path), model=MODEL, mesh=MeshConfig(data=-1, strategy="dp"),
        data=DataConfig(train="synthetic:arithmetic", num_train=16, max_len=16, batch_size=4,
                        arithmetic=ArithmeticTask(max_operand=9)),
        algorithm=grpo_config("grpo", group_size=4), rollout=rl.RolloutConfig(max_new_tokens=6, continuous_slots=4),
        train=TrainConfig(steps=1), checkpoint=CheckpointConfig(every=0),
        logging=LoggingConfig(every=1, console=False, tensorboard=False))
    data = load_run_data(config, "prompt")
    mesh = shd.make_mesh({"data": 2}, devices=jax.devices()[:2])
    policy = CausalLM(MODEL)
    collector, _ = rl.rollout_parts(config, data, mesh, policy, 4, {})
    one = copy.copy(collector)
    s = collector.sampler
    one.sampler = Sampler(policy, max_len=s.max_len, prompt_buckets=s.prompt_buckets, pad_id=s.pad_id)
    params = policy.init(jax.random.key(1))
    batch = next(iter(train_batches(data.train, config.data)))
    got, result, _ = collector.collect(s.load_params(params), batch, iter(()), rng=jax.random.key(2))
    want, want_result, _ = one.collect(one.sampler.load_params(params), batch, iter(()), rng=jax.random.key(2))
    batcher = s.continuous_batcher(num_slots=4)
    assert isinstance(batcher, DataParallelBatcher) and len(batcher.engines) == 2
    # One group fills an engine's 4 slots: both engines served groups, all 4 admitted.
    assert all(e.stats.admissions > 0 for e in batcher.engines) and batcher.stats.admissions == 4
    assert sorted(got) == sorted(want)
    for key in want:
        if key != "columns":
            np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), atol=1e-5, err_msg=key)
    np.testing.assert_array_equal(result.total, want_result.total)
