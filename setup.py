"""rlhf_jax: JAX-native post-training of language models with human feedback."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.12",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.12",
    "etils[epath]>=1.5",  # epath.Path for orbax checkpoint metadata (imported directly by checkpoint.py)
    "transformers>=5.0",
    "tokenizers>=0.21",
    "safetensors>=0.4",
    "tensorflow-datasets>=4.9.9",
    "array_record>=0.7",
    "numpy>=1.26",
    "pyarrow>=15",
    "datasets>=3",  # Hugging Face datasets saved to disk (`save_to_disk`) as a data source
    # tensorflow-datasets and chat templates import these without declaring them.
    "importlib_resources>=6",
    "jinja2>=3.1",
    "tensorboardX>=2.6",
    "tqdm>=4.66",  # the console progress bar (rlhf_jax.metrics)
    "matplotlib>=3.8",
    "qwix>=0.1.8",  # QLoRA's NF4 / int8 quantization of the frozen base (rlhf_jax.models.qlora)
    "math-verify>=0.8",  # the built-in "math" reward's answer equivalence (imported on first use)
]

EXTRAS = {
    # torch and peft are test-time references only (logit parity with transformers, PEFT adapter
    # interop); never imported at runtime.
    # chex: the tests' pytree assertions (trees equal, shapes and dtypes); the library does not import it.
    "test": ["pytest>=8", "pytest-xdist>=3", "chex>=0.1.90", "hypothesis>=6", "peft>=0.17",
             "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],  # tests/test_notebooks.py runs notebooks/
    # jax's own extra pins the libtpu release that matches the installed jax.
    "tpu": ["jax[tpu]>=0.6"],
    "wandb": ["wandb"],
}

setup(
    name="rlhf_jax",
    version="0.1.0",
    description="JAX-native post-training (SFT, reward models, PPO, GRPO, DPO) for language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["rlhf_jax", "rlhf_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["rlhf-jax=rlhf_jax.cli:main"]},
)
