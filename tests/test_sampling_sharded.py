"""The sampler on a device mesh (sharded == single device), the parameter hand-off, and the text API."""

import jax
import numpy as np
import pytest

from rlhf_jax import sharding as shd
from rlhf_jax.models import CausalLM
from rlhf_jax.sampling import Categorical, Greedy, Sampler, SamplerParams
from rlhf_jax.testing import tiny_config
from rlhf_jax.testing.tokenizer import OFFLINE_VOCAB_SIZE, offline_tokenizer

PROMPTS = [[5, 17, 33, 8, 90, 41, 7], [12, 3], [200, 150, 100, 50, 25]]


@pytest.fixture(scope="module")
def lm():
    return CausalLM(tiny_config())


@pytest.fixture(scope="module")
def params(lm):
    return lm.init(jax.random.key(0))


@pytest.mark.parametrize("shape, strategy", [({"data": 2, "tensor": 2}, "tp"), ({"data": 2}, "dp")])
def test_sharded_sampler_equals_single_device(lm, params, shape, strategy):
    single = Sampler(lm, max_len=24, prompt_buckets=(8,))
    mesh = shd.make_mesh(shape, devices=jax.devices()[: int(np.prod(list(shape.values())))])
    sharded = Sampler(lm, max_len=24, prompt_buckets=(8,), mesh=mesh, strategy=strategy)
    # Data parallelism runs one loop per device (no collective per step); tensor parallelism one SPMD loop.
    assert sharded.per_device_loops == (strategy == "dp")
    sp = sharded.load_params(params)
    assert sharded.stats.handoffs == 1 and sharded.stats.handoff_seconds > 0
    # The hand-off placed the weights with the sampler's strategy, layer by layer, on its mesh.
    q_proj = sp.tree["layers"][0]["attn"]["q_proj"]
    assert q_proj.sharding.mesh.shape == mesh.shape
    P = jax.sharding.PartitionSpec
    assert q_proj.sharding.spec == (P(None, "tensor") if strategy == "tp" else P())
    for method in (Categorical(temperature=0.8),):
        a = single.generate(params, PROMPTS, max_new_tokens=6, method=method, num_samples=2, eos_id=2, rng=4)
        b = sharded.generate(sp, PROMPTS, max_new_tokens=6, method=method, num_samples=2, eos_id=2, rng=4)
        assert b.completion_tokens.shape == (6, 6)   # 3 prompts padded to 4 for the data split, then trimmed
        np.testing.assert_array_equal(a.completion_tokens, b.completion_tokens)
        np.testing.assert_array_equal(a.completion_mask, b.completion_mask)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)


def test_handoff_casts_to_the_sampler_dtype(lm, params):
    sampler = Sampler(lm, max_len=24, prompt_buckets=(8,), dtype="bfloat16")
    sp = sampler.load_params(params)
    assert isinstance(sp, SamplerParams)
    assert {a.dtype for a in jax.tree.leaves(sp.tree)} == {np.dtype("bfloat16")}
    assert isinstance(sp.tree["layers"], tuple) and len(sp.tree["layers"]) == lm.config.num_layers
    np.testing.assert_array_equal(
        np.asarray(sp.tree["layers"][1]["mlp"]["up_proj"], np.float32),
        np.asarray(params["layers"]["mlp"]["up_proj"][1].astype("bfloat16"), np.float32),
    )
    out = sampler.generate(sp, PROMPTS, max_new_tokens=4, method=Greedy())
    assert out.logprobs.dtype == np.float32 and np.all(np.asarray(out.logprobs) < 0)


def test_generate_text_round_trips_through_the_tokenizer():
    tok = offline_tokenizer()
    lm = CausalLM(tiny_config(vocab_size=OFFLINE_VOCAB_SIZE))
    params = lm.init(jax.random.key(1))
    sampler = Sampler(lm, max_len=24, prompt_buckets=(8,))
    texts, out = sampler.generate_text(params, ["12+7=", "hi"], tokenizer=tok, max_new_tokens=6,
                                       method=Categorical(), num_samples=2, rng=0)
    assert len(texts) == 4
    ids = tok(["12+7=", "hi"], add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(out.prompt_lengths, [5, 5, 2, 2])
    np.testing.assert_array_equal(np.asarray(out.prompt_tokens)[0, :5], ids[0])
    for text, row, n in zip(texts, np.asarray(out.completion_tokens), np.asarray(out.lengths)):
        assert text == tok.decode(row[:n].tolist(), skip_special_tokens=True)
        # EOS defaults to the tokenizer's: a row that stops ends with it.
        assert (tok.eos_token_id in row[:n].tolist()) == (row[n - 1] == tok.eos_token_id)
    with pytest.raises(TypeError, match="texts must be a sequence of strings"):
        sampler.generate_text(params, "12+7=", tokenizer=tok, max_new_tokens=2)
