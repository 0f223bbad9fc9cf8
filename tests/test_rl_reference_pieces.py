"""The RL reference log-prob pass in micro-batches (`train.rl._reference_logps`) equals the one-piece pass.

The pass runs `num_minibatches * micro_batches` pieces under `lax.map` in one program (the rows of
one update micro-batch at a time); each row's log-probs depend on that row alone, so the pieces
must give the whole-batch values, with and without prompt sharing (`group_size`), on one device and
split over a data-parallel mesh. An oracle that shares no code with the pieces: each row alone.
"""

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding as sh
from rlhf_jax.models import CausalLM
from rlhf_jax.rollout import _merge_groups, _split_groups, completion_logprobs
from rlhf_jax.steps import grpo_config
from rlhf_jax.testing import tiny_config
from rlhf_jax.train.rl import _reference_logps

MODEL = CausalLM(tiny_config(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1,
                             head_dim=16))


def _rollout(n=8, p=6, c=5, group=2):
    rng = np.random.default_rng(0)
    prompts = np.repeat(rng.integers(3, 200, (n // group, p)), group, axis=0).astype(np.int32)
    lengths = np.repeat(rng.integers(2, p + 1, n // group), group).astype(np.int32)
    completions = rng.integers(3, 200, (n, c)).astype(np.int32)
    return jnp.asarray(prompts), jnp.asarray(lengths), jnp.asarray(completions)


def test_split_groups_interleaves_whole_groups_and_inverts():
    x = jnp.arange(16)
    y = _split_groups(x, 4, 2)
    assert y.tolist() == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]]
    assert _split_groups(x, 4, 1).tolist()[0] == [0, 4, 8, 12]  # `split_micro_batches`' interleaving
    assert _merge_groups(y, 2).tolist() == list(range(16))


def test_reference_pass_in_pieces_equals_the_whole_batch_pass():
    params = MODEL.init(jax.random.key(0))
    pt, pl, ct = _rollout()
    one = grpo_config("grpo", group_size=2)
    pieces = grpo_config("grpo", group_size=2, num_minibatches=2, micro_batches=2)
    whole = _reference_logps(MODEL, one)(params, pt, pl, ct)
    # Oracle: every row on its own.
    row = jax.jit(lambda *a: completion_logprobs(MODEL, *a)[0])
    rows = jnp.concatenate([row(params, pt[i:i + 1], pl[i:i + 1], ct[i:i + 1]) for i in range(ct.shape[0])])
    np.testing.assert_allclose(whole, rows, rtol=0, atol=2e-6)
    fn = _reference_logps(MODEL, pieces)
    for group in (1, 2):
        np.testing.assert_allclose(fn(params, pt, pl, ct, group_size=group), whole, rtol=0, atol=2e-6)
    assert "while" in fn.lower(params, pt, pl, ct, group_size=2).as_text()  # pieces loop inside one program
    # Rows split over 4 data-parallel devices: the same values, laid out like the batch.
    mesh = sh.make_mesh({"data": 4}, devices=jax.devices()[:4])
    rows_sharding = sh.batch_sharding(mesh, "dp")
    args = [jax.device_put(x, rows_sharding) for x in (pt, pl, ct)]
    sharded = _reference_logps(MODEL, pieces, mesh, "dp")(params, *args, group_size=2)
    np.testing.assert_allclose(sharded, whole, rtol=0, atol=2e-6)
