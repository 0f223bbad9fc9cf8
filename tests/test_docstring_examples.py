"""The `>>>` examples of the notebook-facing modules run as written and print what they claim.

Each module's examples run as doctests in the module's own namespace plus `jax`, `jnp` and `np`
(what a notebook has imported). The examples round what they print, so they do not depend on the
CPU's float rounding. Modules whose examples are fragments of a larger setup (a mesh, a model, a
checkpoint) are not listed; they were checked by hand.
"""

import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

MODULES = (
    "rlhf_jax.losses.aggregate",
    "rlhf_jax.losses.entropy",
    "rlhf_jax.losses.kl",
    "rlhf_jax.losses.policy",
    "rlhf_jax.losses.preference",
    "rlhf_jax.losses.process_reward",
    "rlhf_jax.losses.reward",
    "rlhf_jax.losses.sft",
    "rlhf_jax.losses.value",
    "rlhf_jax.logprobs",
    "rlhf_jax.advantages",
    "rlhf_jax.kl_control",
    "rlhf_jax.sampling.methods",
    "rlhf_jax.steps.grpo",
    "rlhf_jax.steps.ppo",
    "rlhf_jax.steps.policy_gradient",
    "rlhf_jax.train.overoptimization",
    "rlhf_jax.train.dpo",
    "rlhf_jax.data.batches",
    "rlhf_jax.data.offline_tokenizer",
    "rlhf_jax.data.synthetic",
    "rlhf_jax.agents.tools",
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run_as_written(name):
    module = importlib.import_module(name)
    globs = {**vars(module), "jax": jax, "jnp": jnp, "np": np}
    runner = doctest.DocTestRunner(optionflags=0)
    tests = [t for t in doctest.DocTestFinder().find(module, name, globs=globs) if t.examples]
    assert tests, f"{name} has no docstring examples"
    failures = []
    for test in tests:
        result = runner.run(test, out=failures.append)
        assert result.attempted == len(test.examples)
    assert not failures, "".join(failures)
