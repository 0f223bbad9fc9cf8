"""Hugging Face checkpoints at the edges of the loader: LongRoPE and dynamic-NTK RoPE scaling, Llama / Qwen3
attention and MLP biases, and bare `*Model` backbones (tensor names without the `model.` prefix).

Each case builds a tiny random transformers model in PyTorch, saves it with `save_pretrained`, loads it with
`load_hf` and compares float32 logits (or final hidden states) with transformers' own.
"""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import CausalLM, ModelConfig, RopeScaling
from rlhf_jax.models.heads import init_scalar_head
from rlhf_jax.models.hf import HFCheckpointError, config_from_hf, config_to_hf, load_hf, save_hf

TOL = 1e-5
V = 128
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
THRESHOLD = 16  # original_max_position_embeddings (longrope), max_position_embeddings (dynamic)
SHORT = [1.0 + 0.1 * i for i in range(8)]  # head_dim 16: 8 frequencies
LONG = [1.0 + 1.5 * i for i in range(8)]
# Phi-3's layout: the original context at the top level, the rope dict without it, `factor` implied (64 / 16).
ROPE_CASES = {
    "longrope": dict(max_position_embeddings=64, original_max_position_embeddings=THRESHOLD,
                     rope_scaling={"type": "longrope", "short_factor": SHORT, "long_factor": LONG}),
    "dynamic": dict(max_position_embeddings=THRESHOLD, rope_scaling={"rope_type": "dynamic", "factor": 3.0}),
}
# The same model with the scaling's length dependence switched off (the discriminative reference).
ROPE_SWITCHED_OFF = {
    "longrope": dict(rope_scaling={"type": "longrope", "short_factor": SHORT, "long_factor": SHORT}),
    "dynamic": dict(rope_scaling=None),
}
PROMPT, NEW = 12, 8  # a 12-token prompt decoded to position 19: the threshold is crossed at position 16


def _randomize(model, torch, seed):
    """Random weights everywhere, norms around 1 and biases nonzero, so every tensor matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.15 * noise)


def _torch_forward(model, torch, tokens, positions=None):
    """transformers' logits (or a bare model's last hidden state) of one forward pass, its RoPE state fresh
    (dynamic NTK keeps the longest length seen across calls)."""
    rotary = model.model.rotary_emb if hasattr(model, "model") else model.rotary_emb
    rotary.max_seq_len_cached = rotary.original_max_seq_len
    rotary.inv_freq = rotary.original_inv_freq.clone()
    kwargs = {} if positions is None else {"position_ids": torch.tensor(np.asarray(positions), dtype=torch.long)}
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long), **kwargs)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float().numpy()


def _saved(tmp_path_factory, name, cls, seed, **config):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config_cls = getattr(transformers, cls.replace("ForCausalLM", "Config").replace("Model", "Config"))
    model = getattr(transformers, cls)(config_cls(**{**COMMON, **config})).eval()
    _randomize(model, torch, seed)
    directory = tmp_path_factory.mktemp(name) / "hf"
    model.save_pretrained(directory)
    return types.SimpleNamespace(torch=torch, transformers=transformers, model=model, directory=directory)


def _tokens(rows, length, seed=0):
    return np.random.default_rng(seed).integers(1, V, (rows, length)).astype(np.int32)


# ---------------------------------------------------------------------- LongRoPE and dynamic NTK


@pytest.fixture(scope="module", params=sorted(ROPE_CASES))
def rope_case(request, tmp_path_factory):
    name = request.param
    case = _saved(tmp_path_factory, name, "LlamaForCausalLM", sorted(ROPE_CASES).index(name), **ROPE_CASES[name])
    case.name = name
    case.config, case.params = load_hf(case.directory)
    case.lm = CausalLM(case.config)
    return case


def test_length_dependent_rope_config_reads_transformers_values(rope_case):
    s = rope_case.config.rope_scaling
    assert s.rope_type == rope_case.name
    if rope_case.name == "longrope":  # the top-level original context; factor = 64 / 16 as transformers infers it
        assert (s.original_max_position_embeddings, s.factor) == (THRESHOLD, 4.0)
        assert s.short_factor == tuple(SHORT) and s.long_factor == tuple(LONG)
    else:
        assert (s.factor, rope_case.config.max_position_embeddings) == (3.0, THRESHOLD)
    # transformers' own config class reads our export back to the same ModelConfig
    exported = config_to_hf(rope_case.config)
    theirs = rope_case.transformers.LlamaConfig(**{k: v for k, v in exported.items() if k != "model_type"})
    assert config_from_hf(theirs.to_dict()) == rope_case.config == config_from_hf(json.loads(json.dumps(exported)))


def test_length_dependent_rope_matches_transformers_per_row(rope_case):
    """One batch, row 0 within the threshold (positions 0..11), row 1 past it (8..19): each row's logits equal
    transformers' for that row run alone (the scaling is picked per row, from its largest position)."""
    c, torch = rope_case, rope_case.torch
    tokens = _tokens(2, PROMPT)
    positions = np.stack([np.arange(PROMPT), np.arange(PROMPT) + 8]).astype(np.int32)
    ours = np.asarray(jax.jit(c.lm.forward)(c.params, tokens, positions).logits)
    for row in range(2):
        ref = _torch_forward(c.model, torch, tokens[row:row + 1], positions[row:row + 1])[0]
        assert np.abs(ref).max() > 1.0
        assert np.abs(ours[row] - ref).max() <= TOL, f"{c.name} row {row}: {np.abs(ours[row] - ref).max()}"
    # Discriminative: past the threshold the scaling moves transformers' logits by far more than the tolerance.
    plain = c.transformers.LlamaForCausalLM(c.transformers.LlamaConfig(
        **{**COMMON, **ROPE_CASES[c.name], **ROPE_SWITCHED_OFF[c.name]})).eval()
    plain.load_state_dict(c.model.state_dict())
    ref = _torch_forward(c.model, torch, tokens[1:], positions[1:])[0]
    assert np.abs(_torch_forward(plain, torch, tokens[1:], positions[1:])[0] - ref).max() > 1e-2


def test_cached_decode_across_the_threshold_matches_generate(rope_case):
    """Greedy decoding through our KV cache from a 12-token prompt to position 19 equals transformers'
    `generate`: each key keeps the scaling of the forward pass that wrote it (the prompt's unscaled, the
    decoded tokens' switching at position 16), which a single forward over the whole sequence does not."""
    c, torch = rope_case, rope_case.torch
    prompt = _tokens(1, PROMPT, seed=1)
    _torch_forward(c.model, torch, prompt)  # a fresh RoPE state for generate
    with torch.no_grad():
        gen = c.model.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=NEW, min_new_tokens=NEW,
                               do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    ref = np.stack([x[0].float().numpy() for x in gen.logits])  # [NEW, V]
    sequence = gen.sequences[0].numpy().astype(np.int32)

    cache = c.lm.init_cache(1, PROMPT + NEW)
    out = jax.jit(c.lm.forward)(c.params, prompt, jnp.arange(PROMPT, dtype=jnp.int32)[None], cache=cache)
    ours, cache = [np.asarray(out.logits[0, -1])], out.cache
    step = jax.jit(lambda p, t, pos, kv: c.lm.forward(p, t, pos, cache=kv))
    for i in range(NEW - 1):
        pos = PROMPT + i
        out = step(c.params, sequence[None, pos:pos + 1], jnp.full((1, 1), pos, jnp.int32), cache)
        ours.append(np.asarray(out.logits[0, 0]))
        cache = out.cache
    delta = np.abs(np.stack(ours) - ref).max(axis=-1)
    assert delta.max() <= TOL, f"{c.name}: max |Δ logit| per step {delta}"
    # Discriminative: one forward over the whole sequence rotates every position with the long scaling.
    whole = _torch_forward(c.model, torch, sequence[None, :-1])[0, PROMPT - 1:]
    assert np.abs(whole - ref).max() > 1e-2


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
])
def test_top_level_original_context_wins_as_in_transformers(rope):
    """A config.json with `original_max_position_embeddings` at its top level (Phi-3's layout) and another in
    the rope dict: transformers' `standardize_rope_params` takes the top-level one (llama3, yarn, longrope)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from rlhf_jax.models.layers import rope_angles

    d = {**_llama(max_position_embeddings=64, original_max_position_embeddings=16, rope_scaling=None),
         "rope_parameters": {**rope, "rope_theta": 10000.0}}
    config = config_from_hf(d)
    assert config.rope_scaling.original_max_position_embeddings == 16
    rotary = LlamaRotaryEmbedding(transformers.LlamaConfig(**{k: v for k, v in d.items() if k != "model_type"}))
    positions = np.arange(64)[None]
    with torch.no_grad():
        ref = rotary(torch.zeros(1, 64, 16), torch.tensor(positions))
    cos, sin = rope_angles(jnp.asarray(positions, jnp.int32), config)
    np.testing.assert_allclose(cos, ref[0].numpy(), rtol=0, atol=TOL)  # angles up to 63 rad in float32
    np.testing.assert_allclose(sin, ref[1].numpy(), rtol=0, atol=TOL)


# ------------------------------------------------------------------------------------- biases


BIAS_CASES = {  # name: (transformers class, config) -- transformers adds q/k/v/o biases with attention_bias
    "llama-attention-mlp-bias": ("LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "qwen3-attention-bias": ("Qwen3ForCausalLM", dict(attention_bias=True, head_dim=16, tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", params=sorted(BIAS_CASES))
def bias_case(request, tmp_path_factory):
    name = request.param
    cls, config = BIAS_CASES[name]
    case = _saved(tmp_path_factory, name, cls, 10 + sorted(BIAS_CASES).index(name), max_position_embeddings=64,
                  **config)
    case.name = name
    case.config, case.params = load_hf(case.directory)
    case.lm = CausalLM(case.config)
    case.forward = jax.jit(case.lm.forward)
    return case


def test_bias_checkpoint_logits_match_transformers_and_export_round_trips(bias_case, tmp_path):
    c = bias_case
    llama = c.name.startswith("llama")
    assert (c.config.attention_bias, c.config.attention_out_bias, c.config.mlp_bias) == (True, True, llama)
    layers = c.params["layers"]
    assert layers["attn"]["o_bias"].shape == (2, 32) and ("gate_bias" in layers["mlp"]) == llama
    assert c.lm.logical_axes["layers"]["attn"]["o_bias"] == ("layers", "embed")
    tokens = _tokens(2, PROMPT, seed=2)
    ours = np.asarray(c.forward(c.params, tokens).logits)
    ref = _torch_forward(c.model, c.torch, tokens)
    assert np.abs(ours - ref).max() <= TOL, f"{c.name}: {np.abs(ours - ref).max()}"
    # Discriminative: the biases move the logits.
    no_bias = jax.tree.map(lambda x: x, c.params)
    no_bias["layers"]["attn"]["o_bias"] = np.zeros(no_bias["layers"]["attn"]["o_bias"].shape, np.float32)
    assert np.abs(np.asarray(c.forward(no_bias, tokens).logits) - ours).max() > 1e-2

    out = save_hf(tmp_path / "ours", c.config, c.params)
    again = c.transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    mine, theirs = again.state_dict(), c.model.state_dict()
    assert sorted(mine) == sorted(theirs)
    assert all(c.torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("bias_case", ["llama-attention-mlp-bias"], indirect=True)  # every bias kind
def test_lora_on_a_biased_model_unmerged_equals_merged(bias_case):
    """LoRA on every projection of a model with biases: the unmerged forward (biases after x·W + s·x·A·B)
    equals the plain forward of the merged weights."""
    from rlhf_jax.models.lora import LAYER_TARGETS, LoraConfig, LoraLM

    c = bias_case
    lora_lm = LoraLM(c.lm, LoraConfig(rank=4, alpha=8.0, targets=LAYER_TARGETS))
    rng = np.random.default_rng(1)
    adapters = jax.tree.map(lambda s: rng.normal(0.0, 0.05, s.shape).astype(np.float32),
                            jax.eval_shape(lora_lm.init_adapters, jax.random.key(0)))
    params = lora_lm.init_from_base(c.params, None, adapters=adapters)
    tokens = _tokens(2, PROMPT, seed=3)
    unmerged = np.asarray(jax.jit(lora_lm.forward)(params, tokens).logits)
    merged = np.asarray(c.forward(jax.jit(lora_lm.merge_params)(params), tokens).logits)
    base = np.asarray(c.forward(c.params, tokens).logits)
    assert np.abs(unmerged - merged).max() <= TOL and np.abs(unmerged - base).max() > 1e-2


# ---------------------------------------------------------------------------- bare backbones


@pytest.fixture(scope="module")
def bare_llama(tmp_path_factory):
    """A `LlamaModel` (no LM head, embedding untied) saved on its own, as reward-model and embedding repos are."""
    return _saved(tmp_path_factory, "bare-llama", "LlamaModel", 20, max_position_embeddings=64)


def test_bare_backbone_loads_headless_and_matches_transformers_hidden_states(bare_llama, tmp_path):
    c = bare_llama
    with pytest.raises(HFCheckpointError, match=r"model.safetensors: a bare backbone checkpoint \(LlamaModel: tensor "
                                                r"names without the 'model.' prefix\) with no 'lm_head.weight'"):
        load_hf(c.directory)
    config, params = load_hf(c.directory, allow_headless=True)
    assert "lm_head" not in params and "score" not in params
    with pytest.raises(KeyError, match="params lack 'lm_head', the untied LM head of this model"):
        CausalLM(config).forward(params, _tokens(1, 4))

    rm = CausalLM(config, head="scalar")
    scored = {**params, "score": init_scalar_head(config, jax.random.key(0))}
    tokens = _tokens(2, PROMPT, seed=4)
    hidden = np.asarray(jax.jit(rm.forward)(scored, tokens).hidden)
    ref = _torch_forward(c.model, c.torch, tokens)
    assert np.abs(ref).max() > 1.0 and np.abs(hidden - ref).max() <= TOL


def test_reward_model_starts_from_a_bare_backbone_and_a_policy_is_refused(bare_llama):
    """`checkpoint.init_from` a bare backbone: a reward model gets its backbone (placed in its shardings) and a
    fresh score head; a policy, which needs the LM head the checkpoint lacks, is refused by name."""
    from rlhf_jax import sharding as sh
    from rlhf_jax.train.weights import initial_params

    config, params = load_hf(bare_llama.directory, allow_headless=True)
    mesh = sh.make_mesh({"data": 2, "fsdp": 2}, devices=jax.devices()[:4])
    got = initial_params(CausalLM(config, head="scalar"), str(bare_llama.directory), rng=jax.random.key(5),
                         mesh=mesh, strategy="fsdp")
    assert got["score"].shape == (32,) and "lm_head" not in got
    for a, b in zip(jax.tree.leaves({k: v for k, v in got.items() if k != "score"}), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert got["layers"]["attn"]["q_proj"].sharding.spec == sh.param_shardings(
        CausalLM(config).abstract_params(), CausalLM(config).logical_axes, mesh=mesh,
        strategy="fsdp")["layers"]["attn"]["q_proj"].spec
    with pytest.raises(HFCheckpointError, match="holds no LM head, so it cannot be loaded as a language model"):
        initial_params(CausalLM(config), str(bare_llama.directory), rng=jax.random.key(5))


def test_bare_tied_backbone_is_a_complete_language_model(tmp_path_factory):
    """A bare `Qwen2Model` with tied embeddings loads as a whole LM, as transformers' `from_pretrained` of it."""
    c = _saved(tmp_path_factory, "bare-qwen2-tied", "Qwen2Model", 21, max_position_embeddings=64,
               tie_word_embeddings=True)
    config, params = load_hf(c.directory)
    assert config.tie_word_embeddings and "lm_head" not in params
    lm_ref = c.transformers.AutoModelForCausalLM.from_pretrained(c.directory).eval()
    tokens = _tokens(2, PROMPT, seed=5)
    ours = np.asarray(jax.jit(CausalLM(config).forward)(params, tokens).logits)
    assert np.abs(ours - _torch_forward(lm_ref, c.torch, tokens)).max() <= TOL


# ------------------------------------------------------------------------------- still refused


def _llama(**changes):
    return {**config_to_hf(ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                       num_kv_heads=1, head_dim=16)), **changes}


@pytest.mark.parametrize("config, message", [
    # Phi-3 / Phi-3.5 / Phi-4-mini (LongRoPE) are their own model_type, with fused qkv_proj / gate_up_proj.
    (_llama(model_type="phi3"), "model_type 'phi3' is not supported"),
    (_llama(rope_scaling={"type": "longrope", "short_factor": SHORT[:4], "long_factor": LONG[:4],
                          "original_max_position_embeddings": 16}),
     "longrope's short_factor and long_factor need head_dim / 2 = 8 entries (one per frequency), got 4"),
    (_llama(rope_scaling={"type": "longrope", "short_factor": SHORT, "long_factor": "x"}),
     "longrope rope scaling's long_factor must be a non-empty list of positive numbers, got 'x'"),
    (_llama(rope_scaling={"type": "longrope", "short_factor": SHORT}), "longrope rope scaling lacks 'long_factor'"),
    (_llama(rope_scaling={"type": "dynamic"}), "dynamic rope scaling lacks 'factor'"),
    (_llama(rope_scaling={"type": "longrope", "short_factor": SHORT, "long_factor": LONG},
            partial_rotary_factor=0.75), "partial_rotary_factor 0.75 is not supported"),
    (_llama(attention_bias="yes"), "attention_bias must be true or false, got 'yes'"),
])
def test_still_refused_with_the_key_at_fault(config, message):
    with pytest.raises(HFCheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_hf(config)


def test_config_to_hf_refuses_biases_transformers_cannot_express():
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                head_dim=16)
    for model_type, fields, field in [
            ("llama", dict(attention_bias=True), "attention_out_bias"),
            ("qwen2", dict(attention_bias=True, attention_out_bias=True), "attention_out_bias"),
            ("mistral", dict(mlp_bias=True), "mlp_bias"),
            ("qwen3", dict(qk_norm=True, mlp_bias=True), "mlp_bias")]:
        with pytest.raises(HFCheckpointError, match=f"model_type '{model_type}' requires {field}="):
            config_to_hf(ModelConfig(model_type=model_type, **base, **fields))
    with pytest.raises(ValueError, match="RopeScaling.short_factor must be a non-empty list"):
        RopeScaling(rope_type="longrope", long_factor=(1.0,))
    with pytest.raises(ValueError, match="RopeScaling.short_factor applies to rope_type 'longrope' only"):
        RopeScaling(rope_type="yarn", short_factor=(1.0,))
