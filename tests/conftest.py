"""Test setup: JAX on CPU with 8 simulated devices, configured before jax is imported."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# The suite compiles hundreds of short programs; there, keeping freed host memory (rlhf_jax.host_memory,
# made for long training loops) cost ~8% wall time and 2.7x the kernel time (test_sampling + test_steps_sft,
# twice each). test_host_memory.py checks that mode in its own interpreters.
os.environ.setdefault("RLHF_JAX_HOST_MEMORY", "system")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
