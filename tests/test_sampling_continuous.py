"""Continuous batching over a paged KV cache against the static sampler, request by request."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import CausalLM
from rlhf_jax.models.paged import PagedKVCache, num_extra_reads, pool_route, routed_attention
from rlhf_jax.sampling import Categorical, Greedy, MinP, Request, Sampler, TopK, TopP
from rlhf_jax.testing import tiny_config

MAX_NEW = 14
BLOCK = 4
rng = np.random.default_rng(3)
PROMPTS = [rng.integers(4, 250, size=int(n)).tolist() for n in (7, 2, 5, 11, 3, 8, 6, 4)]
LENGTHS = [14, 3, 9, 1, 12, 6, 14, 2]
# One batcher for every test (one segment program for all method mixes): 8 slots, 12 blocks of 4
# positions, so requests wait for blocks and some are preempted.
POOL = dict(num_slots=8, block_size=BLOCK, num_blocks=12, reserve_blocks=0, methods="all")


@pytest.fixture(scope="module")
def lm():
    return CausalLM(tiny_config())


@pytest.fixture(scope="module")
def params(lm):
    return lm.init(jax.random.key(0))


@pytest.fixture(scope="module")
def sampler(lm):
    return Sampler(lm, max_len=32, prompt_buckets=(8, 16), pad_id=0)


@pytest.fixture(scope="module")
def sp(sampler, params):
    return sampler.load_params(params)


@pytest.fixture(scope="module")
def static_greedy(sampler, sp):
    """Each prompt alone through the static call: greedy tokens and log-probs of MAX_NEW steps."""
    out = []
    for prompt in PROMPTS:
        o = sampler.generate(sp, [prompt], max_new_tokens=MAX_NEW, method=Greedy())
        out.append((np.asarray(o.completion_tokens[0]), np.asarray(o.logprobs[0])))
    return out


def test_paged_forward_equals_dense_cache(lm, params):
    """Prefill + one decode step through scrambled block tables (gathered views, or the whole pool
    under a visibility mask) give the dense cache's logits and hold its keys."""
    c = lm.config

    @jax.jit
    def both(params):
        tokens = jnp.asarray([[5, 9, 33, 2, 70, 1], [8, 8, 40, 0, 0, 0]], jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
        pool = jnp.zeros((c.num_layers, c.num_kv_heads, 9, BLOCK, c.head_dim))
        tables = jnp.asarray([[6, 1, 3], [0, 7, 2]], jnp.int32)        # 3 blocks x 4 = 12 slots per row
        step, at = jnp.asarray([[11], [4]], jnp.int32), jnp.asarray([[6], [3]], jnp.int32)
        d1 = lm.forward(params, tokens, pos, cache=lm.init_cache(2, 12))
        p1 = lm.forward(params, tokens, pos, cache=PagedKVCache(pool, pool, tables))
        d2 = lm.forward(params, step, at, cache=d1.cache)
        p2 = lm.forward(params, step, at, cache=p1.cache)
        # The batcher's decode read: each pool block against its owner row's query (pool_route).
        p4 = lm.forward(params, step, at, cache=p1.cache._replace(route=pool_route(tables, at[:, 0], 9, BLOCK)))
        # Row 0's logical slots 0..6 as the dense cache holds them, read back through its table.
        view = p2.cache.k[:, :, tables[0]].reshape(c.num_layers, c.num_kv_heads, 12, c.head_dim)
        return d1.logits, p1.logits, d2.logits, p2.logits, p4.logits, d2.cache.k[:, 0, :, :7], view[:, :, :7]

    d1, p1, d2, p2, p4, dense_k, paged_k = both(params)
    np.testing.assert_allclose(p1, d1, atol=1e-6)
    np.testing.assert_allclose(p2, d2, atol=1e-6)
    np.testing.assert_allclose(p4, d2, atol=1e-6)
    np.testing.assert_allclose(paged_k, dense_k, atol=1e-6)


def test_greedy_equals_static_alone_with_waits_and_preemption(sampler, sp, static_greedy):
    requests = [Request(prompt=p, max_new_tokens=n, method=Greedy()) for p, n in zip(PROMPTS, LENGTHS)]
    before = None
    for call in range(2):
        outs = sampler.generate_requests(sp, requests, **POOL)
        stats = sampler.continuous_stats()
        for i, (out, (tokens, logps)) in enumerate(zip(outs, static_greedy)):
            n = LENGTHS[i]
            np.testing.assert_array_equal(out.tokens[0], tokens[:n], err_msg=f"request {i}")
            np.testing.assert_allclose(out.logprobs[0], logps[:n], atol=1e-5, err_msg=f"request {i}")
            assert out.finish_reasons == ["length"]
        assert stats.preemptions >= 1 and stats.peak_blocks_in_use <= 12
        assert stats.useful_tokens == sum(LENGTHS)
        assert stats.host_round_trips <= len(PROMPTS) + stats.preemptions + 4
        if call == 0:
            before = sampler.num_compiled()
    assert sampler.num_compiled() == before          # no recompilation on a second call


def test_dense_slot_rows_equal_static_alone(sampler, sp, static_greedy):
    """attention='dense' (one max_len cache row per slot, no paging) decodes the same tokens."""
    requests = [Request(prompt=p, max_new_tokens=n, method=Greedy()) for p, n in zip(PROMPTS, LENGTHS)]
    outs = sampler.generate_requests(sp, requests, num_slots=3, methods="all", attention="dense")
    for i, (out, (tokens, logps)) in enumerate(zip(outs, static_greedy)):
        np.testing.assert_array_equal(out.tokens[0], tokens[: LENGTHS[i]], err_msg=f"request {i}")
        np.testing.assert_allclose(out.logprobs[0], logps[: LENGTHS[i]], atol=1e-5, err_msg=f"request {i}")
    assert sampler.continuous_stats().preemptions == 0


def test_stop_ids_and_sequences(sampler, sp, static_greedy):
    tokens = static_greedy[0][0]
    never = next(t for t in range(256) if t not in tokens)  # a stop sequence that never occurs (ids in the vocab)
    requests = [
        Request(prompt=PROMPTS[0], max_new_tokens=MAX_NEW, method=Greedy(), stop_ids=(int(tokens[4]),)),
        Request(prompt=PROMPTS[0], max_new_tokens=MAX_NEW, method=Greedy(),
                stop_sequences=((never,), tuple(int(t) for t in tokens[5:8]))),
    ]
    first_stop = int(np.flatnonzero(tokens == tokens[4])[0])
    first_seq = next(i for i in range(2, MAX_NEW) if tokens[i - 2: i + 1].tolist() == tokens[5:8].tolist())
    outs = sampler.generate_requests(sp, requests, **POOL)
    np.testing.assert_array_equal(outs[0].tokens[0], tokens[: first_stop + 1])
    np.testing.assert_array_equal(outs[1].tokens[0], tokens[: first_seq + 1])
    assert outs[0].finish_reasons == outs[1].finish_reasons == ["stop"]


METHODS = [Categorical(temperature=0.8), TopK(k=5), TopP(p=0.9, temperature=1.2), MinP(p=0.1), Greedy(),
           Categorical(), TopK(k=3, temperature=0.5), TopP(p=0.5)]


def _sampled_requests():
    return [Request(prompt=p, max_new_tokens=n, method=m, seed=100 + i)
            for i, (p, n, m) in enumerate(zip(PROMPTS, LENGTHS, METHODS))]


def test_sampling_keyed_by_request(sampler, sp):
    """Same seeds -> same completions for any slot count, arrival order or split into calls; and the
    static call with that seed draws the same tokens."""
    requests = _sampled_requests()
    base = sampler.generate_requests(sp, requests, **POOL)
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    shuffled = sampler.generate_requests(sp, [requests[i] for i in order], **POOL)
    halves = (sampler.generate_requests(sp, requests[4:], **POOL)
              + sampler.generate_requests(sp, requests[:4], **POOL))
    narrow = sampler.generate_requests(sp, requests, **{**POOL, "num_slots": 3})
    for i in range(len(requests)):
        for other in (shuffled[order.index(i)], halves[(i + 4) % 8], narrow[i]):
            np.testing.assert_array_equal(other.tokens[0], base[i].tokens[0], err_msg=f"request {i}")
            np.testing.assert_allclose(other.logprobs[0], base[i].logprobs[0], atol=1e-5)
    for i in (2,):   # TopP at T=1.2: the static call's draws
        ref = sampler.generate(sp, [PROMPTS[i]], max_new_tokens=LENGTHS[i], method=METHODS[i], rng=100 + i)
        np.testing.assert_array_equal(base[i].tokens[0], np.asarray(ref.completion_tokens[0]))
        np.testing.assert_allclose(base[i].logprobs[0], np.asarray(ref.logprobs[0]), atol=1e-5)


def test_session_takes_requests_while_others_decode(sampler, sp):
    """The incremental API (multi-turn rollouts): requests submitted one at a time as earlier ones
    come back, while the rest decode, equal the one-call result (draws keyed by request)."""
    requests = _sampled_requests()
    base = sampler.generate_requests(sp, requests, **POOL)
    session = sampler.continuous_batcher(**POOL).session(sp, max_segment_steps=4)
    later = list(range(3, len(requests)))
    handles = {session.submit(requests[i]): i for i in range(3)}
    outputs, busy_submits = {}, 0
    while not session.idle:
        for handle, out in session.advance().items():
            outputs[handles[handle]] = out
            if later:
                busy_submits += session.running > 0
                i = later.pop(0)
                handles[session.submit(requests[i])] = i
    assert busy_submits >= 1 and sorted(outputs) == list(range(len(requests)))
    for i in range(len(requests)):
        np.testing.assert_array_equal(outputs[i].tokens[0], base[i].tokens[0], err_msg=f"request {i}")
        np.testing.assert_allclose(outputs[i].logprobs[0], base[i].logprobs[0], atol=1e-5)


def test_group_shares_prompt_blocks(sampler, sp):
    """8 samples of a 9-token prompt: its 2 full blocks held once, plus per sample the block where
    decoding starts: 2 + 8 = 10 blocks (24 unshared, more than the pool's 12). Completions = the static
    call's group."""
    prompt = PROMPTS[5] + [17]                                          # 9 tokens
    req = Request(prompt=prompt, max_new_tokens=3, method=Categorical(), num_samples=8, seed=5)
    out = sampler.generate_requests(sp, [req], **POOL)
    stats = sampler.continuous_stats()
    assert stats.peak_blocks_in_use == 2 + 8 and stats.preemptions == 0
    ref = sampler.generate(sp, [prompt], max_new_tokens=3, method=Categorical(), num_samples=8, rng=5)
    for j in range(8):
        np.testing.assert_array_equal(out[0].tokens[j], np.asarray(ref.completion_tokens[j]))
        np.testing.assert_allclose(out[0].logprobs[j], np.asarray(ref.logprobs[j]), atol=1e-5)
    assert len({tuple(t) for t in out[0].tokens}) > 1


def test_admission_writes_the_pool_in_place(sampler, sp):
    """The admit program (prefill + the group's block copies + slot state) updates the donated pool
    in place: its optimized HLO copies no pool-shaped buffer (reading the pool back through the
    tables once made XLA copy every layer's pool twice per admission)."""
    from rlhf_jax.sampling.continuous_slots import _SLOT_FIELDS, _HostFields

    b = sampler.continuous_batcher(**POOL)
    cfg = sampler.model.config
    state = b._empty_state()
    trash = np.full((b.num_slots,), b.trash, np.int32)
    init = {f: getattr(_HostFields(b, b.num_slots), f) for f in _SLOT_FIELDS}
    hlo = b._admit.lower(sp.tree, state, np.zeros((1, 8), np.int32), np.full((2,), b.trash, np.int32),
                         np.zeros((b.num_slots,), np.int32), trash, np.zeros((b.num_slots,), bool),
                         init).compile().as_text()
    pool = f"f32[{cfg.num_kv_heads},{b.num_blocks + 1},{BLOCK},{cfg.head_dim}]"
    assert pool in hlo
    assert [line for line in hlo.splitlines() if pool in line and " copy(" in line] == []


def test_request_errors(sampler, sp):
    with pytest.raises(ValueError, match="request 1: prompt of 30 tokens"):
        sampler.generate_requests(sp, [Request(prompt=[5], max_new_tokens=2),
                                       Request(prompt=[5] * 30, max_new_tokens=8)], **POOL)
    with pytest.raises(ValueError, match="num_samples=9 exceeds num_slots=8"):
        sampler.generate_requests(sp, [Request(prompt=[5], max_new_tokens=2, num_samples=9)], **POOL)
    with pytest.raises(ValueError, match="Request.max_new_tokens"):
        Request(prompt=[5], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"request 0: stop_ids / stop_sequences hold ids \[256, 999\] outside"):
        sampler.generate_requests(sp, [Request(prompt=[5], max_new_tokens=2, stop_ids=(256,),
                                               stop_sequences=((3, 999),))], **POOL)


@pytest.mark.parametrize("kwargs, error, message", [
    # A batch of prompts is not one prompt (it used to be flattened into (5, 17, 3, 4)).
    (dict(prompt=[[5, 17], [3, 4]]), ValueError, r"flat sequence of token ids .* shape \(2, 2\)"),
    # -1 is the stop table's "none" sentinel: as a stop id it never matched, in a stop sequence it
    # matched the empty history (a sequence (-1, t) ended the sample at its first token t).
    (dict(stop_ids=(-1,)), ValueError, r"Request.stop_ids must hold token ids \(ints >= 0\), got -1"),
    (dict(stop_sequences=((-1, 147),)), ValueError, r"Request.stop_sequences\[0\] must hold token ids"),
    (dict(stop_ids="12"), TypeError, r"Request.stop_ids must be a sequence of token ids, got '12'"),
    (dict(stop_ids=3), TypeError, r"Request.stop_ids must be a sequence of token ids, got 3"),
    # A bad seed used to fail at submit as "generate: rng must be ..." (naming neither Request nor seed).
    (dict(seed="7"), TypeError, r"Request.seed must be None, an int or a single PRNG key, got '7'"),
    (dict(seed=True), TypeError, r"Request.seed must be None, an int or a single PRNG key, got True"),
    (dict(seed=2.0), TypeError, r"Request.seed must be None, an int or a single PRNG key, got 2.0"),
])
def test_request_refuses_ambiguous_prompts_and_stop_ids(kwargs, error, message):
    with pytest.raises(error, match=message):
        Request(**{"prompt": [5, 17], "max_new_tokens": 2, **kwargs})
    ok = Request(prompt=np.array([5, 17]), max_new_tokens=2, stop_ids=np.array([3, 4]), stop_sequences=[[7, 8]])
    assert (ok.prompt, ok.stop_ids, ok.stop_sequences) == ((5, 17), (3, 4), ((7, 8),))


def test_sliding_window_model_decodes_as_the_static_call():
    """A sliding-window model through the default pool read: the route used to let each query see
    every earlier key (greedy tokens diverged from the 3rd, log-probs off by 0.17). Greedy alone and a
    sampled group of 3 sharing the prompt's blocks (extra reads) equal the static call."""
    lm = CausalLM(tiny_config(sliding_window=5))
    sampler = Sampler(lm, max_len=32, prompt_buckets=(16,), pad_id=0)
    sp = sampler.load_params(lm.init(jax.random.key(0)))
    prompt = list(range(20, 30))
    reqs = [Request(prompt=prompt, max_new_tokens=12, method=Greedy()),
            Request(prompt=prompt, max_new_tokens=12, method=Categorical(), num_samples=3, seed=4)]
    outs = sampler.generate_requests(sp, reqs, num_slots=4, block_size=BLOCK, methods="all")
    for out, req in zip(outs, reqs):
        ref = sampler.generate(sp, [prompt], max_new_tokens=12, method=req.method, num_samples=req.num_samples,
                               rng=0 if req.seed is None else req.seed)
        for j in range(req.num_samples):
            np.testing.assert_array_equal(out.tokens[j], np.asarray(ref.completion_tokens[j]), err_msg=f"{j}")
            np.testing.assert_allclose(out.logprobs[j], np.asarray(ref.logprobs[j]), atol=1e-5)


def test_call_arguments_fail_before_any_work(sampler, sp, static_greedy):
    """max_segment_steps=0 decoded nothing and `run` looped forever; an iterator of requests was
    consumed by the type check (TypeError: generator has no len()); a group whose prompt blocks
    exceed the pool raised only once the requests before it had run (their outputs lost)."""
    req = Request(prompt=PROMPTS[0], max_new_tokens=MAX_NEW, method=Greedy())
    batcher = sampler.continuous_batcher(**POOL)
    for steps in (0, -1, 2.5):
        with pytest.raises(ValueError, match=rf"max_segment_steps must be an int >= 1, got {steps}"):
            batcher.run(sp, [req], max_segment_steps=steps)
    with pytest.raises(ValueError, match="max_segment_steps must be an int >= 1, got 0"):
        batcher.session(sp, max_segment_steps=0)
    outs = sampler.generate_requests(sp, iter([req, req]), **POOL)
    assert len(outs) == 2 and all(np.array_equal(o.tokens[0], static_greedy[0][0]) for o in outs)
    big = Request(prompt=[5] * 21, max_new_tokens=2, num_samples=8)     # 5 shared + 8 own blocks > 12
    with pytest.raises(ValueError, match=r"request 1: its prompt needs 13 KV blocks for num_samples=8; the pool "
                                         r"has 12 \(num_blocks\)"):
        sampler.generate_requests(sp, [req, big], **POOL)


def test_numpy_int_batcher_options_are_accepted(sampler, sp, static_greedy):
    out = sampler.generate_requests(sp, [Request(prompt=PROMPTS[0], max_new_tokens=MAX_NEW, method=Greedy())],
                                    num_slots=np.int64(2), block_size=np.int64(BLOCK), num_blocks=np.int64(16))
    np.testing.assert_array_equal(out[0].tokens[0], static_greedy[0][0])


def test_to_sample_output_packs_rows_like_the_static_call():
    from rlhf_jax.sampling.requests import RequestOutput, to_sample_output

    reqs = [Request(prompt=[7, 8, 9], max_new_tokens=4, num_samples=2), Request(prompt=[5], max_new_tokens=3)]
    outs = [RequestOutput(tokens=[np.asarray([4, 2]), np.asarray([6, 6, 6, 6])],
                          logprobs=[np.asarray([-1.0, -2.0]), np.asarray([-0.5] * 4)],
                          finish_reasons=["stop", "length"]),
            RequestOutput(tokens=[np.asarray([9])], logprobs=[np.asarray([-3.0])], finish_reasons=["stop"])]
    so = to_sample_output(reqs, outs, pad_id=0)
    np.testing.assert_array_equal(so.prompt_tokens, [[7, 8, 9], [7, 8, 9], [5, 0, 0]])
    np.testing.assert_array_equal(so.completion_tokens, [[4, 2, 0, 0], [6, 6, 6, 6], [9, 0, 0, 0]])
    np.testing.assert_array_equal(so.completion_mask.sum(1), [2, 4, 1])
    np.testing.assert_array_equal(so.logprobs[0], [-1.0, -2.0, 0, 0])
    np.testing.assert_array_equal(so.truncated, [False, True, False])
    np.testing.assert_array_equal(so.prompt_lengths, [3, 3, 1])
    # Outputs that do not match the requests: an error, not a dropped request (zip stopped at the
    # shorter list), an IndexError, or a token with a 0.0 log-prob under the completion mask.
    with pytest.raises(ValueError, match="to_sample_output: 1 outputs for 2 requests"):
        to_sample_output(reqs, outs[:1])
    with pytest.raises(ValueError, match="to_sample_output: 0 outputs for 0 requests"):
        to_sample_output([], [])
    with pytest.raises(ValueError, match=r"output 0 has \(1, 1, 1\) .* num_samples=2"):
        to_sample_output(reqs[:1], [RequestOutput(tokens=[np.asarray([4])], logprobs=[np.asarray([-1.0])],
                                                  finish_reasons=["stop"])])
    with pytest.raises(ValueError, match=r"output 1 sample 0: tokens \(2,\) and logprobs \(1,\)"):
        to_sample_output(reqs, [outs[0], RequestOutput(tokens=[np.asarray([9, 9])], logprobs=[np.asarray([-3.0])],
                                                       finish_reasons=["stop"])])


@pytest.mark.parametrize("window", [None, 5])
def test_routed_attention_shared_blocks_equal_reference(window):
    """Blocks shared by rows (a group's prompt) are read once more per further row (the extra reads):
    every row's output = the reference einsum over its gathered view, for any extra capacity; with a
    sliding window only the keys less than `window` positions back (the route ignored it once)."""
    from rlhf_jax.models.attention import reference_attention
    from rlhf_jax.models.paged import paged_view

    r = np.random.default_rng(0)
    n1, w = 21, 6
    tables = np.full((5, w), n1 - 1, np.int32)
    tables[0, :3], tables[1, :2], tables[2, :4], tables[4, :1] = [3, 7, 1], [3, 9], [3, 7, 12, 2], [15]
    pos = jnp.asarray([9, 6, 13, 0, 2], jnp.int32)
    pk, pv = (jnp.asarray(r.standard_normal((2, n1, BLOCK, 8)), jnp.float32) for _ in range(2))
    q = jnp.asarray(r.standard_normal((5, 1, 4, 8)), jnp.float32)       # 2 query heads per kv head
    assert num_extra_reads(tables, n1 - 1) == 3                           # block 3 twice more, block 7 once
    view = jnp.arange(w * BLOCK)[None, None, :] <= pos[:, None, None]
    if window is not None:
        view = view & (pos[:, None, None] - jnp.arange(w * BLOCK)[None, None, :] < window)
    ref = jax.jit(lambda t: reference_attention(q, paged_view(pk, t), paged_view(pv, t), view, kv_axes="bksd"))(
        jnp.asarray(tables))
    routed = jax.jit(lambda tables, extra: routed_attention(
        q, pk, pv, pool_route(tables, pos, n1, BLOCK, extra, sliding_window=window)), static_argnums=1)
    for extra in (3, 8):
        out = routed(jnp.asarray(tables), extra)
        np.testing.assert_allclose(np.asarray(out)[[0, 1, 2, 4]], np.asarray(ref)[[0, 1, 2, 4]], atol=1e-6)
        np.testing.assert_array_equal(np.asarray(out)[3], 0.0)          # row 3 holds no block


def test_rollout_collector_continuous_greedy_equals_static(sampler, sp):
    """RolloutCollector with rollout.continuous_slots samples through continuous batching: greedy
    groups of 2 with an EOS stop equal the static call's rows (tokens, masks, lengths, log-probs 1e-5)."""
    from rlhf_jax.sampling import SamplingConfig
    from rlhf_jax.train.rollouts import RolloutCollector

    eos = int(sampler.generate(sp, [PROMPTS[0]], max_new_tokens=MAX_NEW, method=Greedy()).completion_tokens[0, 3])
    sampling = SamplingConfig(max_new_tokens=10, method=Greedy(), num_samples=2, eos_id=eos)
    prompts = np.zeros((4, 11), np.int32)
    for i, p in enumerate(PROMPTS[:4]):
        prompts[i, : len(p)] = p
    batch = {"prompt_tokens": prompts, "prompt_lengths": np.asarray([len(p) for p in PROMPTS[:4]], np.int32),
             "example_mask": np.asarray([1, 1, 0, 1], bool), "columns": {"id": ["a", "b", "c", "d"]}}
    make = lambda slots: RolloutCollector(sampler=sampler, tokenizer=None, sources=[], weights=None,  # noqa: E731
                                          train_sampling=sampling, eval_sampling=sampling, continuous_slots=slots)
    static = make(0).sample(sp, batch, sampling, jax.random.key(1))
    cont = make(4).sample(sp, batch, sampling, jax.random.key(1))
    assert sorted(cont) == sorted(static) and cont["columns"] == static["columns"]
    assert np.asarray(static["truncated"]).tolist().count(False) >= 2     # some rows stopped at EOS
    for key in static:
        if key != "columns":
            np.testing.assert_allclose(np.asarray(cont[key]), np.asarray(static[key]), atol=1e-5, err_msg=key)


def test_combined_filters_decode_as_the_static_call(lm, params, sampler, sp):
    """top_k + top_p + min_p (`Filtered`, transformers' chain) in continuous batching's slots, mixed
    with single-filter requests: the static call's tokens and log-probs for the same seed; every
    token inside the chain's kept set of the full forward's logits, its log-prob the untruncated
    `log softmax(logits / T)` (NumPy, float64)."""
    from rlhf_jax.sampling import Filtered, make_method

    method = make_method(temperature=0.2, top_k=40, top_p=0.6, min_p=0.5)
    assert type(method) is Filtered
    combined = (1, 5)       # prompts in one bucket: one static program
    requests = [Request(prompt=PROMPTS[i], max_new_tokens=MAX_NEW, method=method if i in combined else METHODS[i],
                        seed=200 + i) for i in range(6)]
    outs = sampler.generate_requests(sp, requests, **POOL)
    forward = jax.jit(lambda tokens: lm.forward(params, tokens).logits)
    narrower = 0
    for i in combined:
        ref = sampler.generate(sp, [PROMPTS[i]], max_new_tokens=MAX_NEW, method=method, rng=200 + i)
        tokens = outs[i].tokens[0]
        np.testing.assert_array_equal(tokens, np.asarray(ref.completion_tokens[0]))
        np.testing.assert_allclose(outs[i].logprobs[0], np.asarray(ref.logprobs[0]), atol=1e-5)
        seq = np.zeros((1, 32), np.int32)
        seq[0, : len(PROMPTS[i]) + MAX_NEW] = PROMPTS[i] + tokens.tolist()
        z = np.asarray(forward(jnp.asarray(seq))[0, len(PROMPTS[i]) - 1:][:MAX_NEW], np.float64) / 0.2
        kept = np.isfinite(np.asarray(method.truncate(jnp.asarray(z, jnp.float32))))
        assert kept[np.arange(MAX_NEW), tokens].all()
        narrower += int((kept.sum(-1) < 40).sum())          # top-p / min-p cut inside the top 40
        full = z - z.max(-1, keepdims=True)
        full = full - np.log(np.exp(full).sum(-1, keepdims=True))
        np.testing.assert_allclose(outs[i].logprobs[0], full[np.arange(MAX_NEW), tokens], atol=2e-5)
    assert narrower == 2 * MAX_NEW
