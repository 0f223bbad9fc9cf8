"""Issue 21: the trainer-to-sampler hand-off as one resharding program, and one-step off-policy RL.

Hand-off: FSDP trainer weights -> a tensor-parallel bfloat16 sampler, on the same 8 devices (one
compiled program, no host gather) and on a disjoint half (the program on the trainer's devices, then
shard-to-shard copies), both bit-exact to gathering to the host and re-splitting by hand.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import array as jax_array

from rlhf_jax import sharding as shd
from rlhf_jax.models import CausalLM
from rlhf_jax.sampling import Sampler
from rlhf_jax.sampling import sampler as sampler_module
from rlhf_jax.testing import tiny_config


@pytest.fixture(scope="module")
def lm():
    return CausalLM(tiny_config())


def _fsdp_params(lm, devices):
    mesh = shd.make_mesh({"fsdp": len(devices)}, devices=devices)
    shardings = shd.param_shardings(lm.abstract_params(), lm.logical_axes, mesh=mesh, strategy="fsdp")
    return jax.jit(lm.init, out_shardings=shardings)(jax.random.key(0))


@pytest.mark.parametrize("trainer, sampler_devices, path", [(range(8), range(8), "program"),
                                                            (range(4), range(4, 8), "program+copy")])
def test_handoff_fsdp_to_tp_is_one_program_bit_exact(lm, monkeypatch, trainer, sampler_devices, path):
    devices = jax.devices()
    params = _fsdp_params(lm, [devices[i] for i in trainer])
    mesh = shd.make_mesh({"tensor": 2, "data": -1}, devices=[devices[i] for i in sampler_devices])
    sampler = Sampler(lm, max_len=16, prompt_buckets=(8,), mesh=mesh, strategy="tp", dtype="bfloat16")
    # Count host gathers (jax.device_put between layouts it cannot copy shard to shard reads
    # `Array._value`, which the transfer guard does not see) and compilations.
    gathers = collections.Counter()
    value = jax_array.ArrayImpl._value
    monkeypatch.setattr(jax_array.ArrayImpl, "_value",
                        property(lambda self: (gathers.update(["host"]), value.fget(self))[1]))
    before = collections.Counter(sampler_module._COMPILES)
    with jax.transfer_guard_host_to_device("disallow"), jax.transfer_guard_device_to_host("disallow"):
        for _ in range(2):
            out = sampler.load_params(params).tree
    compiled = {k: v - before[k] for k, v in sampler_module._COMPILES.items() if v != before[k]}
    assert compiled == {f"jit({sampler._names[0]})": 1}   # one program, compiled once for this layout
    assert gathers["host"] == 0 and sampler.stats.handoff_path == path
    monkeypatch.undo()
    # By hand: gather to the host, split the layers, cast, and cut each device's slice.
    host = jax.tree.map(np.asarray, params)
    layers = host.pop("layers")
    expected = {**{k: v for k, v in host.items()},
                "layers": tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(lm.config.num_layers))}
    flat_out, flat_want = jax.tree.leaves_with_path(out), jax.tree.leaves_with_path(expected)
    assert [p for p, _ in flat_out] == [p for p, _ in flat_want]
    wanted_shardings = jax.tree.leaves(sampler._decode_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    sampler_set = {devices[i] for i in sampler_devices}
    for (name, got), (_, want), sharding in zip(flat_out, flat_want, wanted_shardings):
        want = want.astype(jnp.bfloat16)
        assert got.dtype == jnp.bfloat16 and got.sharding == sharding, name
        assert {s.device for s in got.addressable_shards} == sampler_set
        for shard in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data).view(np.uint16), want[shard.index].view(np.uint16),
                                          err_msg=jax.tree_util.keystr(name))
    # The tensor-parallel layout really differs from the trainer's: q_proj split on its output heads.
    assert out["layers"][0]["attn"]["q_proj"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
