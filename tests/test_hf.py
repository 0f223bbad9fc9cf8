"""Hugging Face interop: logit parity with transformers' PyTorch models, exact round trips, bad input.

The parity tests build tiny random transformers models in PyTorch (skipped cleanly without torch);
the config, round-trip and bad-input tests need numpy and safetensors only.
"""

import json
import os
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rlhf_jax.models import CausalLM, ModelConfig, RopeScaling
from rlhf_jax.models.heads import gather_last
from rlhf_jax.models.hf import HFCheckpointError, check_replaceable, config_from_hf, config_to_hf, load_hf, save_hf
from rlhf_jax.testing import tiny_config

B, T = 3, 12
LENGTHS = (12, 8, 5)  # right padding: row b has LENGTHS[b] real tokens
POSITION_OFFSET = 300  # beyond Llama 3's original context in the scaled case, so the scaling matters
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-6)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=256)
# Qwen2.5's long-context recipe at a small original context (POSITION_OFFSET lies past it), factor =
# max_position_embeddings / original as transformers expects; and a linearly interpolated Llama.
YARN_ROPE = dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0, original_max_position_embeddings=128)
LINEAR_ROPE = dict(rope_type="linear", rope_theta=10000.0, factor=3.0)
# name: (transformers config class, overrides, overrides that switch the family's feature off)
HF_CASES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False), None),
    "llama-tied-mha": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=4), None),
    "llama3-rope": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE),
                    dict(rope_parameters=dict(rope_type="default", rope_theta=500000.0))),
    "llama-linear-rope": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters=LINEAR_ROPE),
                          dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    "qwen2-yarn-rope": ("Qwen2Config", dict(tie_word_embeddings=False, rope_parameters=YARN_ROPE),
                        dict(rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "mistral-window": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=4),
                       dict(sliding_window=None)),
    # MQA (one kv head) with an explicit head_dim != hidden_size / num_attention_heads, as Mistral Nemo has.
    "mistral-mqa-hd24-window": ("MistralConfig", dict(tie_word_embeddings=False, num_key_value_heads=1, head_dim=24,
                                                     sliding_window=4), dict(sliding_window=None)),
    "qwen2-tied": ("Qwen2Config", dict(tie_word_embeddings=True), None),
    "qwen2-window": ("Qwen2Config", dict(tie_word_embeddings=False, use_sliding_window=True,
                                         sliding_window=4, max_window_layers=0),
                     dict(use_sliding_window=False)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=32), None),
    "qwen3-tied": ("Qwen3Config", dict(tie_word_embeddings=True, head_dim=32), None),
    "qwen3-window": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=8, use_sliding_window=True,
                                         sliding_window=4, max_window_layers=0),
                     dict(use_sliding_window=False)),
}


# ------------------------------------------------------------------------------------ helpers


def _batch(seed=0, pad_id=0):
    rng = np.random.default_rng(seed)
    mask = np.arange(T)[None, :] < np.array(LENGTHS)[:, None]
    tokens = np.where(mask, rng.integers(1, COMMON["vocab_size"], (B, T)), pad_id).astype(np.int32)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32) + POSITION_OFFSET, (B, T))
    return tokens, mask, positions


def _randomize(model, torch, seed):
    """Random weights everywhere, norms around 1 and biases nonzero, so every tensor matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def _hf_logits(model, torch, tokens, mask, positions=None):
    kwargs = {} if positions is None else {"position_ids": torch.tensor(positions, dtype=torch.long)}
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long), **kwargs)
    return out.logits.float().numpy()


def _our_logits(config, params, tokens, positions):
    return np.asarray(jax.jit(CausalLM(config).forward)(params, tokens, positions).logits)


def _assert_trees_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def _assert_state_dicts_equal(m1, m2, torch):
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert sorted(s1) == sorted(s2)
    for key in s1:
        assert s1[key].dtype == s2[key].dtype, key
        assert torch.equal(s1[key], s2[key]), key


def _random_params(config, seed=0, head="lm"):
    """Random values for every parameter (norms too), straight from the abstract shapes."""
    rng = np.random.default_rng(seed)
    abstract = CausalLM(config, head=head).abstract_params()
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape).astype(s.dtype)), abstract)


# -------------------------------------------------------------------------------- torch parity


@pytest.fixture(scope="module", params=sorted(HF_CASES))
def hf_case(request, tmp_path_factory):
    """A tiny random transformers model of one family, saved with save_pretrained (safetensors)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    name = request.param
    cls, overrides, feature_off = HF_CASES[name]

    def build(**changes):
        hf_config = getattr(transformers, cls)(**{**COMMON, **overrides, **changes})
        return transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()

    torch.manual_seed(0)
    model = build()
    _randomize(model, torch, seed=sorted(HF_CASES).index(name))
    directory = tmp_path_factory.mktemp(name) / "hf"
    model.save_pretrained(directory)
    tokens, mask, positions = _batch()
    ref = _hf_logits(model, torch, tokens, mask, positions)
    ref_feature_off = None
    if feature_off is not None:
        plain = build(**feature_off)
        plain.load_state_dict(model.state_dict())
        ref_feature_off = _hf_logits(plain, torch, tokens, mask, positions)
    return types.SimpleNamespace(name=name, torch=torch, transformers=transformers, model=model,
                                 directory=directory, tokens=tokens, mask=mask, positions=positions, ref=ref,
                                 ref_feature_off=ref_feature_off)


def test_logit_parity_with_transformers(hf_case):
    config, params = load_hf(hf_case.directory)
    logits = _our_logits(config, params, hf_case.tokens, hf_case.positions)
    assert logits.dtype == np.float32 and logits.shape == (B, T, COMMON["vocab_size"])
    assert np.abs(hf_case.ref).max() > 1.0  # the comparison is not between near-zero logits
    delta = np.abs(logits - hf_case.ref)[hf_case.mask]
    assert delta.max() <= (2e-5 if "rope" in hf_case.name else 1e-4), f"{hf_case.name}: max |Δ logit| = {delta.max()}"

    # The case is discriminative: without its feature (rope scaling, sliding window) the reference
    # logits move by far more than the tolerance.
    if hf_case.ref_feature_off is not None:
        assert np.abs(hf_case.ref_feature_off - hf_case.ref)[hf_case.mask].max() > 1e-2


def test_loaded_config_matches_family(hf_case):
    config, params = load_hf(hf_case.directory)
    _, overrides, _ = HF_CASES[hf_case.name]
    assert config.model_type == hf_case.model.config.model_type
    assert config.tie_word_embeddings == overrides["tie_word_embeddings"]
    assert ("lm_head" in params) != config.tie_word_embeddings
    assert config.attention_bias == (config.model_type == "qwen2")
    assert config.qk_norm == (config.model_type == "qwen3")
    assert config.head_dim == overrides.get("head_dim", 16)
    assert config.sliding_window == (4 if "window" in hf_case.name else None)
    assert (config.rope_scaling is not None) == hf_case.name.endswith("-rope")
    if config.rope_scaling is not None:  # the rope_parameters dict, every key kept
        rope = dict(overrides["rope_parameters"])
        assert config.rope_theta == rope.pop("rope_theta")
        assert {k: v for k, v in config.rope_scaling.hf_parameters().items() if k in rope} == rope


def test_save_hf_round_trip_through_transformers(hf_case, tmp_path):
    config, params = load_hf(hf_case.directory)
    out = save_hf(tmp_path / "ours", config, params)
    again_config, again_params = load_hf(out)
    assert again_config == config
    _assert_trees_bit_equal(again_params, params)

    reloaded = hf_case.transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded) is type(hf_case.model)
    _assert_state_dicts_equal(hf_case.model, reloaded, hf_case.torch)
    np.testing.assert_array_equal(
        _hf_logits(reloaded, hf_case.torch, hf_case.tokens, hf_case.mask, hf_case.positions), hf_case.ref
    )


def test_left_padding_and_greedy_decode_match_transformers(tmp_path):
    """Left padding as segment ids (0 = pad) and positions from the first real token equals transformers
    with an attention mask; greedy decoding through our KV cache past a sliding window equals `generate`."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=3, max_window_layers=0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    _randomize(model, torch, seed=9)
    model.save_pretrained(tmp_path / "hf")
    config, params = load_hf(tmp_path / "hf")
    lm = CausalLM(config)
    assert config.sliding_window == 3

    tokens, right_mask, _ = _batch(seed=4)
    mask = np.ascontiguousarray(right_mask[:, ::-1])  # left padding
    tokens = np.where(mask, tokens[:, ::-1], 0).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    ref = _hf_logits(model, torch, tokens, mask, positions)
    ours = np.asarray(jax.jit(lm.forward)(params, tokens, positions, mask.astype(np.int32)).logits)
    assert np.abs(ours - ref)[mask].max() <= 1e-4

    prompt, new = tokens[:1], 10  # row 0 has no padding
    with torch.no_grad():
        expected = model.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=new, do_sample=False,
                                  pad_token_id=0).numpy()[0, T:]
    step = jax.jit(lm.forward)
    out = step(params, prompt, np.arange(T, dtype=np.int32)[None], cache=lm.init_cache(1, T + new))
    generated = [int(np.argmax(out.logits[0, -1]))]
    for t in range(T, T + new - 1):
        out = step(params, np.array([[generated[-1]]], np.int32), np.array([[t]], np.int32), cache=out.cache)
        generated.append(int(np.argmax(out.logits[0, -1])))
    assert generated == expected.tolist(), (generated, expected)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """One tiny untied GQA Llama in float32 and bfloat16 for the dtype and sharding tests."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)).eval()
    _randomize(model, torch, seed=11)
    root = tmp_path_factory.mktemp("llama")
    model.save_pretrained(root / "f32")
    model_bf16 = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)).to(torch.bfloat16)
    model_bf16.load_state_dict(model.state_dict())
    model_bf16.save_pretrained(root / "bf16")
    return types.SimpleNamespace(torch=torch, transformers=transformers, model=model, model_bf16=model_bf16,
                                 root=root)


def test_bf16_checkpoint_loads_bit_exact(hf_llama, tmp_path):
    torch = hf_llama.torch
    config, params = load_hf(hf_llama.root / "bf16")
    assert config.param_dtype == "bfloat16" and config.dtype == "bfloat16"
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    # Layout check on raw bits: our q_proj [E, H, D] is HF's [H*D, E] transposed.
    hf_q = hf_llama.model_bf16.model.layers[1].self_attn.q_proj.weight.detach().view(torch.int16).numpy()
    ours_q = np.asarray(params["layers"]["attn"]["q_proj"][1]).view(np.int16)
    np.testing.assert_array_equal(ours_q.reshape(64, 64).T, hf_q)

    out = save_hf(tmp_path / "bf16", config, params)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    _assert_trees_bit_equal(load_hf(out)[1], params)
    reloaded = hf_llama.transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    _assert_state_dicts_equal(hf_llama.model_bf16, reloaded, torch)


def test_load_converts_dtype_on_request(hf_llama):
    _, f32 = load_hf(hf_llama.root / "f32")
    config, bf16 = load_hf(hf_llama.root / "f32", dtype="bfloat16")
    assert config.param_dtype == "bfloat16"
    _assert_trees_bit_equal(bf16, jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), f32))
    _, up = load_hf(hf_llama.root / "bf16", dtype="float32")
    _assert_trees_bit_equal(up, jax.tree.map(lambda x: np.asarray(x).astype(np.float32), bf16))


def test_sharded_save_and_load(hf_llama, tmp_path):
    config, params = load_hf(hf_llama.root / "f32")
    out = save_hf(tmp_path / "sharded", config, params, max_shard_size=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and not (out / "model.safetensors").exists()
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    stored = {}
    for file in files:
        stored.update(load_file(out / file))
    assert set(stored) == set(index["weight_map"]) == set(hf_llama.model.state_dict())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in stored.values())
    # Every shard stays under the limit unless it holds a single larger tensor.
    for file in files:
        shard = load_file(out / file)
        assert sum(a.nbytes for a in shard.values()) <= 100_000 or len(shard) == 1

    _assert_trees_bit_equal(load_hf(out)[1], params)
    reloaded = hf_llama.transformers.AutoModelForCausalLM.from_pretrained(out)
    _assert_state_dicts_equal(hf_llama.model, reloaded, hf_llama.torch)


def test_load_checkpoint_sharded_by_transformers(hf_llama, tmp_path):
    hf_llama.model.save_pretrained(tmp_path / "hf_sharded", max_shard_size="100KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").exists()
    _, sharded = load_hf(tmp_path / "hf_sharded")
    _assert_trees_bit_equal(sharded, load_hf(hf_llama.root / "f32")[1])


def _saved_reward_model(hf_config, path, *, seed: int):
    """A randomised transformers `*ForSequenceClassification` of `hf_config`, saved to `path`."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(
        hf_config, attn_implementation="eager").eval()
    _randomize(model, torch, seed=seed)
    model.save_pretrained(path)
    return model


def test_sequence_classification_scalar_head(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = _saved_reward_model(transformers.Qwen3Config(**COMMON, head_dim=32, num_labels=1, pad_token_id=0),
                                tmp_path / "rm", seed=5)
    tokens, mask, _ = _batch(seed=3, pad_id=0)  # HF pools at the last token that is not pad_token_id
    ref = _hf_logits(model, torch, tokens, mask)[:, 0]

    config, params = load_hf(tmp_path / "rm")
    assert "score" in params and "lm_head" not in params and params["score"].shape == (64,)
    out = jax.jit(CausalLM(config, head="scalar").forward)(params, tokens)
    rewards = np.asarray(gather_last(out.values, mask))
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(rewards, ref, atol=1e-4, rtol=0)

    saved = save_hf(tmp_path / "ours", config, params)
    assert json.loads((saved / "config.json").read_text())["architectures"] == ["Qwen3ForSequenceClassification"]
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(saved)
    assert reloaded.config.num_labels == 1
    _assert_state_dicts_equal(model, reloaded, torch)


def test_scalar_head_with_pad_equal_to_eos_warns_on_load_and_save(tmp_path):
    """transformers scores at the last token that is not pad_token_id; with pad == EOS that is the token
    before a trailing EOS, not the mask's last real token that rlhf_jax reads: a warning, both ways."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = _saved_reward_model(transformers.LlamaConfig(**COMMON, num_labels=1, pad_token_id=2, eos_token_id=2),
                                tmp_path / "rm", seed=7)
    tokens = np.array([[5, 6, 7, 2, 2, 2], [8, 9, 10, 11, 12, 2]], np.int32)  # EOS-terminated, pad = EOS
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    ref = _hf_logits(model, torch, tokens, mask)[:, 0]

    with pytest.warns(UserWarning, match="pad_token_id 2 is also an EOS id") as record:
        config, params = load_hf(tmp_path / "rm")
    assert str(tmp_path / "rm" / "config.json") in str(record[0].message)
    values = np.asarray(jax.jit(CausalLM(config, head="scalar").forward)(params, tokens).values)
    np.testing.assert_allclose(values[[0, 1], [2, 4]], ref, atol=1e-5, rtol=0)  # the tokens before the EOS
    assert np.abs(np.asarray(gather_last(values, mask)) - ref).min() > 1e-3     # not the EOS the mask ends at

    with pytest.warns(UserWarning, match="give the model config a pad_token_id that is not an EOS id"):
        save_hf(tmp_path / "ours", config, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_hf(tmp_path / "distinct", config.replace(pad_token_id=0), params)  # pad 0 != EOS: no warning


# ------------------------------------------------------------------------------------ configs


ROUND_TRIP_CONFIGS = {
    "llama3": tiny_config(rope_theta=500000.0, rope_scaling=RopeScaling(original_max_position_embeddings=256),
                          eos_token_id=(5, 6), bos_token_id=1),
    "mistral": tiny_config(model_type="mistral", sliding_window=8, param_dtype="bfloat16", dtype="bfloat16"),
    "qwen2": tiny_config(model_type="qwen2", attention_bias=True, tie_word_embeddings=True, pad_token_id=0),
    "qwen2-window": tiny_config(model_type="qwen2", attention_bias=True, sliding_window=16),
    "qwen3": tiny_config(model_type="qwen3", qk_norm=True, head_dim=32, rms_norm_eps=1e-5),
    "qwen3-yarn-mscale": tiny_config(model_type="qwen3", qk_norm=True, max_position_embeddings=64, rope_scaling=RopeScaling(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=16.0, beta_slow=2.0, mscale=0.8,
        mscale_all_dim=0.5, truncate=False)),
    "qwen2-yarn-attention-factor": tiny_config(model_type="qwen2", attention_bias=True, max_position_embeddings=64,
                                               rope_scaling=RopeScaling(rope_type="yarn", factor=4.0,
                                                                        original_max_position_embeddings=16,
                                                                        attention_factor=1.25)),
    "mistral-linear": tiny_config(model_type="mistral", rope_scaling=RopeScaling(rope_type="linear", factor=2.0)),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_CONFIGS))
def test_config_round_trip(name):
    config = ROUND_TRIP_CONFIGS[name]
    hf = config_to_hf(config)
    assert config_from_hf(hf) == config
    assert config_from_hf(json.loads(json.dumps(hf))) == config


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_CONFIGS))
def test_transformers_reads_config_as_we_do(name):
    """transformers' own config class, given our dict, serializes back to the same ModelConfig."""
    transformers = pytest.importorskip("transformers")
    config = ROUND_TRIP_CONFIGS[name]
    hf = config_to_hf(config)
    kwargs = {k: v for k, v in hf.items() if k != "model_type"}
    theirs = transformers.AutoConfig.for_model(hf["model_type"], **kwargs).to_dict()
    assert config_from_hf(theirs) == config


def test_config_from_legacy_llama31_json(tmp_path):
    """A Llama 3.1 config.json in the transformers 4 layout (rope_theta + rope_scaling, torch_dtype)."""
    legacy = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "hidden_act": "silu", "mlp_bias": False,
        "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    }
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    expected = ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        rms_norm_eps=1e-5, param_dtype="bfloat16", dtype="bfloat16", bos_token_id=128000,
        eos_token_id=(128001, 128008, 128009),
    )
    assert config_from_hf(tmp_path) == expected
    assert config_from_hf(tmp_path / "config.json") == expected


def test_config_qwen25_yarn_long_context_recipe():
    """Qwen2.5's documented YaRN block (legacy `type` key, no betas): the betas take transformers' defaults 32 / 1,
    transformers' own config class reads the dict the same way, and the export writes it back with those keys."""
    d = {"model_type": "qwen2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32768,
         "rope_theta": 1000000.0, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    config = config_from_hf(d)
    assert config.rope_scaling == RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768,
                                              beta_fast=32.0, beta_slow=1.0, truncate=True)
    assert config_to_hf(config)["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 32768, "beta_fast": 32.0,
                                                   "beta_slow": 1.0, "truncate": True}
    # betas given as null or 0 mean the defaults too (transformers reads `get(key) or default`); a null factor
    # is max_position_embeddings / original; an absent original is max_position_embeddings
    zero = config_from_hf({**d, "rope_scaling": {"rope_type": "yarn", "factor": None, "beta_fast": 0, "beta_slow": None,
                                                 "original_max_position_embeddings": 8192}})
    assert zero.rope_scaling == RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=8192)
    assert config_from_hf({**d, "rope_scaling": {"type": "yarn", "factor": 2.0}}).rope_scaling == RopeScaling(
        rope_type="yarn", factor=2.0, original_max_position_embeddings=32768)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoConfig.for_model("qwen2", **{k: v for k, v in d.items() if k != "model_type"})
    assert config_from_hf(theirs.to_dict()) == config


def test_config_qwen25_ignores_unused_sliding_window():
    """Qwen2.5 configs carry sliding_window with use_sliding_window=false: no window, q/k/v bias."""
    d = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
         "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
         "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 21,
         "rope_theta": 1000000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    config = config_from_hf(d)
    assert config.sliding_window is None and config.attention_bias and config.head_dim == 64
    assert config.rope_theta == 1e6 and config.tie_word_embeddings


def test_config_float16_checkpoint_upcasts():
    d = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
         "num_hidden_layers": 1, "num_attention_heads": 2, "torch_dtype": "float16"}
    config = config_from_hf(d)
    assert config.param_dtype == "float32" and config.num_kv_heads == 2 and config.head_dim == 4


@pytest.mark.parametrize("model_type, keys, expected", [
    ("mistral", dict(num_key_value_heads=2), dict(sliding_window=4096, num_kv_heads=2)),
    ("mistral", dict(num_attention_heads=8), dict(sliding_window=4096, num_kv_heads=8)),
    ("mistral", dict(num_key_value_heads=2, sliding_window=None), dict(sliding_window=None)),
    ("qwen2", dict(num_attention_heads=32, use_sliding_window=True, max_window_layers=0),
     dict(sliding_window=4096, num_kv_heads=32, head_dim=2)),
    ("qwen3", dict(num_key_value_heads=2, use_sliding_window=True, max_window_layers=0),
     dict(sliding_window=4096, head_dim=128)),
    ("qwen3", dict(num_key_value_heads=2, sliding_window=8), dict(sliding_window=None, head_dim=128)),
    ("llama", dict(sliding_window=8), dict(sliding_window=None, num_kv_heads=4, head_dim=16)),
])
def test_config_omitted_keys_take_transformers_defaults(model_type, keys, expected):
    """A key a config.json omits means the transformers class default (Mistral's 4096-token window, Qwen3's
    head_dim 128, the kv heads), as transformers' own config class reads the same dict."""
    d = {"model_type": model_type, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, **keys}
    config = config_from_hf(d)
    assert {k: getattr(config, k) for k in expected} == expected
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in d.items() if k != "model_type"})
    ids = dict(bos_token_id=None, eos_token_id=None)  # Llama's and Mistral's default ids 1, 2 are not read
    assert config_from_hf(theirs.to_dict()).replace(**ids) == config.replace(**ids)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    # Gemma 4's proportional RoPE: refused naming the key; LongRoPE with a factor per frequency missing
    ({"rope_scaling": {"rope_type": "proportional", "factor": 2.0}},
     "rope_scaling.rope_type 'proportional' is not supported (supported: 'default', 'dynamic', 'linear', 'llama3', "
     "'longrope', 'yarn')"),
    ({"rope_parameters": {"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}},
     "longrope's short_factor and long_factor need head_dim / 2 = 8 entries (one per frequency), got 1"),
    ({"rope_scaling": {"type": "linear"}}, "linear rope scaling lacks 'factor'"),
    ({"rope_scaling": {"type": "linear", "factor": -2.0}}, "linear rope scaling's factor must be a positive number, got -2.0"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "beta_fast": -1}},
     "yarn rope scaling's beta_fast must be a positive number, got -1"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "truncate": "yes"}},
     "yarn rope scaling's truncate must be true or false, got 'yes'"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "mscale": "1"}}, "yarn rope scaling's mscale must be a number"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}},
     "yarn rope scaling's original_max_position_embeddings must be a positive integer, got 0"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"mlp_bias": "yes"}, "mlp_bias must be true or false, got 'yes'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ({"vocab_size": None}, "missing required key 'vocab_size'"),
    ({"hidden_size": "big"}, "hidden_size must be a positive integer, got 'big'"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers must be a positive integer, got 2.5"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
    ({"head_dim": True}, "head_dim must be a positive integer, got True"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a number, got '1e-6'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "ten thousand"}},
     "rope_theta must be a positive number, got 'ten thousand'"),
    ({"num_attention_heads": 3}, "num_heads"),  # ModelConfig's own check, still naming the file
    # Wrong-typed values are refused by name, never coerced ("false" is not true) or crashing unnamed.
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps must be positive, got -1.0"),
    ({"rope_parameters": [1, 2]}, "rope_parameters must be an object, got [1, 2]"),
    ({"rope_scaling": "llama3"}, "rope_scaling must be an object, got 'llama3'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1, "high_freq_factor": 4}},
     "llama3 rope scaling's factor must be a positive number, got '8'"),
    ({"eos_token_id": "2"}, "eos_token_id must be an integer token id or a list of them, got '2'"),
    ({"pad_token_id": 1.5}, "pad_token_id must be an integer token id or a list of them, got 1.5"),
    ({"architectures": "LlamaForCausalLM"}, "architectures must be a list of class names"),
    ({"model_type": "mistral", "sliding_window": "8"}, "sliding_window must be a positive integer or null, got '8'"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4, "layer_types": None,
      "max_window_layers": "x"}, "max_window_layers must be an integer >= 0, got 'x'"),
    ({"model_type": "mistral", "sliding_window": 8, "layer_types": ["full_attention"] * 2},
     "transformers' Mistral ignores layer_types and windows every layer to sliding_window 8"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1}},
     "llama3 rope scaling: RopeScaling needs 0 < low_freq_factor < high_freq_factor"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4, "layer_types": "full"},
     "layer_types must list 'full_attention' or 'sliding_attention' for each of the 2 layers, got 'full'"),
])
def test_config_errors_name_file_and_key(tmp_path, change, message):
    d = {**config_to_hf(tiny_config()), **change}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(HFCheckpointError) as err:
        config_from_hf(tmp_path)
    assert message in str(err.value) and str(tmp_path / "config.json") in str(err.value)


def test_config_mixed_sliding_layers_rejected():
    d = {**config_to_hf(tiny_config(model_type="qwen2", attention_bias=True)),
         "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
    d.pop("layer_types")
    with pytest.raises(HFCheckpointError, match="mixes full and sliding-window"):
        config_from_hf(d)


@pytest.mark.parametrize("change, field", [
    (dict(qk_norm=True), "qk_norm"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(sliding_window=8), "sliding_window"),
    (dict(model_type="qwen2"), "attention_bias"),
    (dict(model_type="qwen3"), "qk_norm"),
])
def test_config_to_hf_refuses_inexpressible(change, field):
    with pytest.raises(HFCheckpointError, match=field):
        config_to_hf(tiny_config(**change))


# ------------------------------------------------------------------------- checkpoint errors


@pytest.fixture
def ckpt(tmp_path):
    """A valid tiny untied float32 checkpoint written by save_hf."""
    config = tiny_config()
    params = _random_params(config)
    directory = save_hf(tmp_path / "ckpt", config, params)
    return types.SimpleNamespace(config=config, params=params, dir=directory,
                                 file=directory / "model.safetensors")


def _rewrite(file, edit):
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_load_round_trip_without_torch(ckpt):
    config, params = load_hf(ckpt.dir)
    assert config == ckpt.config
    _assert_trees_bit_equal(params, ckpt.params)
    o_proj = load_file(ckpt.file)["model.layers.1.self_attn.o_proj.weight"]  # HF [E, H*D]
    np.testing.assert_array_equal(o_proj, np.asarray(params["layers"]["attn"]["o_proj"][1]).reshape(64, 64).T)


def test_missing_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)


def test_missing_weights(ckpt):
    ckpt.file.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf(ckpt.dir)


@pytest.mark.parametrize("edit, tensor, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight", "missing tensor"),
    (lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((128, 64), np.float32)}),
     "model.layers.2.mlp.up_proj.weight", "unexpected tensor"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}),
     "model.layers.0.self_attn.k_proj.weight", "has shape [64, 64], expected [32, 64]"),
    (lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)}), "model.norm.weight",
     "has dtype I32, expected a floating dtype"),
    (lambda t: t.update({"lm_head.weight": t["lm_head.weight"].astype(np.float16)}), "lm_head.weight",
     "has dtype F16, but the checkpoint declares F32"),
])
def test_bad_tensors_name_file_and_tensor(ckpt, edit, tensor, message):
    _rewrite(ckpt.file, edit)
    with pytest.raises(HFCheckpointError) as err:
        load_hf(ckpt.dir)
    text = str(err.value)
    assert message in text and repr(tensor) in text and "model.safetensors" in text


def test_explicit_dtype_converts_mixed_float_tensors(ckpt):
    _rewrite(ckpt.file, lambda t: t.update({"lm_head.weight": t["lm_head.weight"].astype(np.float16)}))
    _, params = load_hf(ckpt.dir, dtype="float32")
    expected = np.asarray(ckpt.params["lm_head"]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), expected)


def test_sharded_index_errors(ckpt, tmp_path):
    directory = save_hf(tmp_path / "sharded", ckpt.config, ckpt.params, max_shard_size="60kB")
    index_file = directory / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = index["weight_map"]["model.layers.1.self_attn.q_proj.weight"]

    # A tensor the index lists for a shard that does not hold it.
    _rewrite(directory / shard, lambda t: t.pop("model.layers.1.self_attn.q_proj.weight"))
    with pytest.raises(HFCheckpointError) as err:
        load_hf(directory)
    assert shard in str(err.value) and "'model.layers.1.self_attn.q_proj.weight'" in str(err.value)

    # A tensor in a shard that the index does not list.
    del index["weight_map"]["model.layers.1.self_attn.q_proj.weight"]
    index["weight_map"]["model.norm.weight"] = shard
    index_file.write_text(json.dumps(index))
    with pytest.raises(HFCheckpointError, match="(missing|unexpected) tensor 'model.norm.weight'"):
        load_hf(directory)

    # An index entry that is not a .safetensors file of this directory (a number, a path out of it).
    for bad in (5, "../ckpt/model.safetensors", "."):
        index_file.write_text(json.dumps({**index, "weight_map": {**index["weight_map"], "model.norm.weight": bad}}))
        with pytest.raises(HFCheckpointError) as err:
            load_hf(directory)
        assert str(index_file) in str(err.value) and f"tensor 'model.norm.weight' the file {bad!r}" in str(err.value)

    # A shard that does not exist.
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00099-of-00099.safetensors"):
        load_hf(directory)


def test_tied_checkpoint_with_stored_lm_head(tmp_path):
    config = tiny_config(tie_word_embeddings=True)
    params = _random_params(config)
    directory = save_hf(tmp_path / "tied", config, params)
    file = directory / "model.safetensors"
    assert "lm_head.weight" not in load_file(file)
    _rewrite(file, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    _assert_trees_bit_equal(load_hf(directory)[1], params)  # an identical copy is accepted
    _rewrite(file, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1.0}))
    with pytest.raises(HFCheckpointError, match="'lm_head.weight' differs from 'model.embed_tokens.weight'"):
        load_hf(directory)


def test_legacy_rotary_buffers_are_ignored(ckpt):
    _rewrite(ckpt.file, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    _assert_trees_bit_equal(load_hf(ckpt.dir)[1], ckpt.params)


def test_load_with_shardings(ckpt):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_vocab = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    shardings = jax.tree.map(lambda _: replicated, ckpt.params)
    shardings["embed"] = by_vocab
    _, params = load_hf(ckpt.dir, shardings=shardings)
    assert params["embed"].sharding == by_vocab and params["lm_head"].sharding == replicated
    _assert_trees_bit_equal(params, ckpt.params)
    del shardings["lm_head"]
    with pytest.raises(ValueError, match="lm_head"):
        load_hf(ckpt.dir, shardings=shardings)


# ---------------------------------------------------------------------------------- save_hf


def test_save_refuses_existing_directory_and_overwrites_on_request(ckpt):
    before = ckpt.file.read_bytes()
    other = _random_params(ckpt.config, seed=1)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf(ckpt.dir, ckpt.config, other)
    assert ckpt.file.read_bytes() == before
    save_hf(ckpt.dir, ckpt.config, other, overwrite=True)
    _assert_trees_bit_equal(load_hf(ckpt.dir)[1], other)
    assert sorted(os.listdir(ckpt.dir.parent)) == ["ckpt"]  # no staging or retired directories left


def test_save_failure_leaves_nothing(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, directory):
            with open(os.path.join(directory, "tokenizer.json"), "w") as f:
                f.write("{}")
            raise RuntimeError("disk full")

    config = tiny_config()
    with pytest.raises(RuntimeError, match="disk full"):
        save_hf(tmp_path / "out", config, _random_params(config), BrokenTokenizer())
    assert os.listdir(tmp_path) == []


def test_save_over_a_file_size_limit_names_the_file_and_keeps_the_old_export(tmp_path):
    """A write that fails midway (here RLIMIT_FSIZE, as a full disk would) raises OSError naming the
    weights file and the directory; an earlier export there is unchanged and nothing else is left."""
    import subprocess
    import sys

    config = tiny_config()
    out = save_hf(tmp_path / "out", config, _random_params(config))
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    script = (
        "import resource, jax\n"
        "from rlhf_jax.models import CausalLM\n"
        "from rlhf_jax.models.hf import save_hf\n"
        "from rlhf_jax.testing import tiny_config\n"
        "params = CausalLM(tiny_config()).init(jax.random.key(1))\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))\n"
        "try:\n"
        f"    save_hf({str(out)!r}, tiny_config(), params, overwrite=True)\n"
        "except OSError as err:\n"
        "    print('ERROR', err)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert f"ERROR save_hf: writing model.safetensors of {out} failed" in result.stdout, result.stdout + result.stderr
    assert os.listdir(tmp_path) == ["out"]
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_save_writes_tokenizer_and_readable_permissions(tmp_path):
    class Tokenizer:
        def save_pretrained(self, directory):
            with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
                f.write("{}")

    config = tiny_config()
    out = save_hf(tmp_path / "out", config, _random_params(config), Tokenizer())
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.pop("lm_head"), "params lack lm_head"),
    (lambda p: p["layers"]["attn"].update(q_bias=np.zeros((2, 4, 16), np.float32)), "params have layers/attn/q_bias"),
    (lambda p: p["layers"]["mlp"].update(up_proj=np.zeros((2, 64, 64), np.float32)),
     "param layers/mlp/up_proj has shape"),
    (lambda p: p.update(embed=np.asarray(p["embed"]).astype(jnp.bfloat16)), "cast all params to one dtype"),
])
def test_save_rejects_mismatched_params(tmp_path, edit, message):
    config = tiny_config()
    params = _random_params(config)
    edit(params)
    with pytest.raises(HFCheckpointError, match=message):
        save_hf(tmp_path / "out", config, params)
    assert os.listdir(tmp_path) == []


def test_save_rejects_bad_shard_size(tmp_path):
    config = tiny_config()
    with pytest.raises(ValueError, match="max_shard_size"):
        save_hf(tmp_path / "out", config, _random_params(config), max_shard_size="lots")


# ------------------------------------------------------------------ export for generation (issue 22)


def _successor_params(config, chain):
    """Weights whose greedy next token after `chain[i]` is `chain[i + 1]`: the layers add nothing to the
    residual stream, token `chain[i]` embeds as basis vector i, and the LM head maps basis i to `chain[i + 1]`."""
    params = jax.tree.map(np.array, _random_params(config, seed=3))
    params["layers"]["attn"]["o_proj"][:] = 0.0
    params["layers"]["mlp"]["down_proj"][:] = 0.0
    params["final_norm"]["scale"][:] = 1.0
    params["lm_head"][:] = 0.0
    for i, (token, successor) in enumerate(zip(chain, chain[1:])):
        params["embed"][token] = 0.0
        params["embed"][token, i] = 1.0
        params["lm_head"][i, successor] = 10.0
    return params


def test_export_writes_token_ids_and_transformers_generate_stops_at_eos(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from rlhf_jax.checkpoint import Checkpointer
    from rlhf_jax.cli import main
    from rlhf_jax.config import CheckpointConfig
    from rlhf_jax.data.offline_tokenizer import offline_tokenizer, save_offline_tokenizer

    tok = offline_tokenizer()
    config = tiny_config()  # no token ids of its own: they come from the run's tokenizer
    a, b, c = tok.convert_tokens_to_ids(["a", "b", "c"])
    eos = tok.eos_token_id
    run = tmp_path / "run"
    with Checkpointer(run / "checkpoints", config=CheckpointConfig(async_save=False), model_config=config) as ck:
        ck.save(7, {"params": _successor_params(config, [a, b, c, eos])})
    save_offline_tokenizer(run / "tokenizer")
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"exported {run}/checkpoints (step 7) to {out} with its tokenizer"
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    assert json.loads((out / "generation_config.json").read_text()) == ids
    hf_config = json.loads((out / "config.json").read_text())
    assert {k: hf_config[k] for k in ids} == ids

    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.generation_config.eos_token_id == eos == 2
    prompt = torch.tensor([[tok.bos_token_id, a]])
    with torch.no_grad():
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False)
    assert generated[0, 2:].tolist() == [b, c, eos]  # stopped at <eos>, 3 of the 10 tokens allowed
    assert transformers.AutoTokenizer.from_pretrained(out).decode(generated[0, 2:]) == "bc<eos>"

    # The overwrite refusal names the CLI flag (and is checked before the checkpoint is read).
    capsys.readouterr()  # transformers' loading bar
    assert main(["export", str(run), str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"rlhf-jax export: error: export: {out} exists; pass --overwrite to " \
                                              "replace it"
    assert main(["convert", str(run / "checkpoints"), str(out)]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert main(["convert", str(run / "checkpoints"), str(out), "--overwrite"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"wrote Hugging Face directory {out} from checkpoint {run}/checkpoints (step 7)")
    with pytest.raises(FileExistsError, match="pass overwrite=True, or --overwrite on the command line"):
        save_hf(out, config, _successor_params(config, [a, b]))


def test_generation_config_stops_at_every_eos_of_model_and_tokenizer(tmp_path):
    from rlhf_jax.data.offline_tokenizer import offline_tokenizer

    config = tiny_config(eos_token_id=5, bos_token_id=None)
    out = save_hf(tmp_path / "out", config, _random_params(config), offline_tokenizer())
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 1, "eos_token_id": [5, 2], "pad_token_id": 0}
    hf_config = json.loads((out / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"], hf_config["pad_token_id"]) == (1, 5, 0)
    assert not os.path.exists(save_hf(tmp_path / "bare", tiny_config(), _random_params(tiny_config()))
                              / "generation_config.json")  # nothing known: no file
    small = tiny_config(vocab_size=2)
    with pytest.raises(HFCheckpointError, match=r"save_hf: eos_token_id \[2\] \(model config or tokenizer\) is "
                                                r"outside the model's vocabulary of 2 ids"):
        save_hf(tmp_path / "small", small, _random_params(small), offline_tokenizer())
    assert sorted(os.listdir(tmp_path)) == ["bare", "out"]


def test_export_and_convert_never_replace_what_they_read_or_what_is_not_an_export(tmp_path, capsys):
    from rlhf_jax.checkpoint import Checkpointer
    from rlhf_jax.cli import main
    from rlhf_jax.config import CheckpointConfig
    from rlhf_jax.data.offline_tokenizer import save_offline_tokenizer

    config = tiny_config()
    run = tmp_path / "runs" / "sft"
    with Checkpointer(run / "checkpoints", config=CheckpointConfig(async_save=False), model_config=config) as ck:
        ck.save(7, {"params": _random_params(config)})
    save_offline_tokenizer(run / "tokenizer")
    (run / "config.json").write_text("{}\n")
    (run / "metrics.jsonl").write_text('{"step": 7}\n')
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')

    def tree(root):
        return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else b"") for p in root.rglob("*"))

    before = tree(tmp_path)
    refused = {
        ("export", run, run): "contains",
        ("export", run, tmp_path / "runs"): "contains",
        ("export", run, run / "checkpoints" / "7"): "lies inside",
        ("export", run, run / "tokenizer" / "hf"): "lies inside",  # the run's tokenizer is read too
        ("convert", run / "checkpoints", run / "checkpoints"): "is",
        ("export", run, run / "tokenizer"): "is " + str(run / "tokenizer") + ", which it reads from",
        ("export", run, data): "holds files that are not a Hugging Face model or PEFT adapter",
    }
    for (command, src, dst), words in refused.items():
        assert main([command, str(src), str(dst), "--overwrite"]) == 2, (command, dst)
        assert words in capsys.readouterr().err, (command, dst)
    assert tree(tmp_path) == before  # nothing deleted, nothing written

    hf = tmp_path / "hf"
    hf.mkdir()  # an empty directory may be replaced, and so may an earlier export
    assert main(["export", str(run), str(hf), "--overwrite"]) == 0
    assert main(["export", str(run), str(hf), "--overwrite"]) == 0
    exported = tree(hf)
    assert main(["convert", str(hf), str(hf / "ckpt")]) == 2  # a checkpoint written into the model it reads
    assert "lies inside" in capsys.readouterr().err
    assert tree(hf) == exported
    (hf / "adapter_config.json").write_text("{}")  # a PEFT directory counts as an export
    check_replaceable(hf, overwrite=True, caller="t")
    with pytest.raises(FileExistsError, match="is not a directory"):
        check_replaceable(data / "train.jsonl", overwrite=True, caller="t")


# ------------------------------------------------------- export_hf from Python: the run's checkpoint


def _run_dir(root, config, *, head="lm", seed=0, tokenizer=True):
    """A run directory as training leaves it: `checkpoints/` (step 4) and, optionally, `tokenizer/`."""
    from rlhf_jax.checkpoint import Checkpointer
    from rlhf_jax.config import CheckpointConfig
    from rlhf_jax.data.offline_tokenizer import save_offline_tokenizer

    params = _random_params(config, seed=seed, head=head)
    params = jax.tree.map(lambda x: (0.6 * x).astype(x.dtype), params)  # keep bf16 activations moderate
    if head == "scalar":  # rewards of order 1
        params["score"] = (5 * params["score"]).astype(params["score"].dtype)
    with Checkpointer(root / "checkpoints", config=CheckpointConfig(async_save=False), model_config=config) as ck:
        ck.save(4, {"params": params})
    if tokenizer:
        save_offline_tokenizer(root / "tokenizer")
    return params


EXPORT_CASES = {  # name: (model config overrides, head)
    "llama-untied": (dict(), "lm"),
    "qwen2-bias-tied": (dict(model_type="qwen2", attention_bias=True, tie_word_embeddings=True), "lm"),
    "llama-bf16": (dict(param_dtype="bfloat16", dtype="bfloat16"), "lm"),
    "reward-model": (dict(), "scalar"),
    "reward-model-bf16": (dict(param_dtype="bfloat16", dtype="bfloat16"), "scalar"),
}


@pytest.mark.parametrize("name", sorted(EXPORT_CASES))
def test_export_hf_from_python_writes_the_runs_tokenizer_and_transformers_matches(name, tmp_path):
    """`export_hf(run/checkpoints, out)` from a notebook, no tokenizer given, exports what `rlhf-jax export`
    does: the run's tokenizer and its pad/EOS ids, so transformers scores a right-padded batch of 3 rows
    (it refuses batches > 1 without a pad id). Log-probs and rewards equal ours (float32: 1e-5; bfloat16:
    the weights bit for bit, outputs within bf16 rounding), and config.json's dtype is the tensors'."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    from rlhf_jax.checkpoint_hf import export_hf
    from rlhf_jax.logprobs import token_logprobs

    overrides, head = EXPORT_CASES[name]
    config = tiny_config(**overrides)
    params = _run_dir(tmp_path / "run", config, head=head, seed=len(name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the run's tokenizer gives the ids
        assert export_hf(tmp_path / "run" / "checkpoints", tmp_path / "hf") == (str(tmp_path / "hf"), 4)
    out = tmp_path / "hf"
    hf_config = json.loads((out / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"], hf_config["pad_token_id"]) == (1, 2, 0)
    assert hf_config["dtype"] == hf_config["torch_dtype"] == config.param_dtype
    with safe_open(out / "model.safetensors", "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16" if "bf16" in name else "F32"}
    assert (out / "tokenizer.json").exists()
    assert transformers.AutoTokenizer.from_pretrained(out).pad_token_id == 0

    bf16 = config.param_dtype == "bfloat16"
    tokens, mask, _ = _batch(seed=2, pad_id=0)
    auto = transformers.AutoModelForCausalLM if head == "lm" else transformers.AutoModelForSequenceClassification
    model = auto.from_pretrained(out, dtype=torch.bfloat16 if bf16 else torch.float32,
                                 attn_implementation="eager").eval()
    assert model.dtype == (torch.bfloat16 if bf16 else torch.float32)
    if bf16:  # the weights transformers holds are ours, bit for bit
        np.testing.assert_array_equal(
            model.model.embed_tokens.weight.detach().view(torch.int16).numpy(),
            np.asarray(params["embed"]).view(np.int16))
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                       attention_mask=torch.tensor(mask, dtype=torch.long)).logits.float().numpy()
    ours = jax.jit(CausalLM(config, head=head).forward)(params, tokens)
    if head == "lm":
        assert json.loads((out / "generation_config.json").read_text()) == {
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
        ours = np.asarray(token_logprobs(ours.logits[:, :-1].astype(jnp.float32), tokens[:, 1:]))
        theirs = np.asarray(token_logprobs(jnp.asarray(theirs[:, :-1]), tokens[:, 1:]))
        valid = mask[:, 1:]
    else:
        assert not (out / "generation_config.json").exists()
        ours = np.asarray(gather_last(ours.values, mask)).astype(np.float32)
        theirs, valid = theirs[:, 0], np.ones(B, bool)
    assert np.abs(ours).max() > 1.0  # not a comparison of near-zero numbers
    tolerance = 2**-6 * np.abs(ours).max() if bf16 else 1e-5  # bf16: 4 units of its 8-bit mantissa
    assert np.abs(ours - theirs)[valid].max() <= tolerance


def test_export_hf_without_a_tokenizer_warns_what_transformers_will_refuse(tmp_path):
    """No tokenizer beside the checkpoints (or `tokenizer=None`) and no ids in the model config: a reward
    model's export has no pad id, a policy's no EOS; each export says so and what to pass."""
    from rlhf_jax.checkpoint_hf import export_hf

    _run_dir(tmp_path / "rm", tiny_config(), head="scalar", tokenizer=False)
    with pytest.warns(UserWarning) as record:
        export_hf(tmp_path / "rm" / "checkpoints", tmp_path / "rm_hf")
    assert [str(w.message) for w in record] == [
        f"save_hf: {tmp_path / 'rm_hf'}: no pad_token_id in the model config or a tokenizer, so "
        "transformers' *ForSequenceClassification refuses to score batches of more than one row; pass the run's "
        "tokenizer (tokenizer=) or set the model config's pad_token_id"]
    assert json.loads((tmp_path / "rm_hf" / "config.json").read_text())["pad_token_id"] is None

    _run_dir(tmp_path / "lm", tiny_config())
    with pytest.warns(UserWarning, match="no eos_token_id in the model config or a tokenizer, so transformers' "
                                         "generate will not stop at an end-of-sequence token"):
        export_hf(tmp_path / "lm" / "checkpoints", tmp_path / "lm_hf", tokenizer=None)  # the run's is not wanted
    assert sorted(os.listdir(tmp_path / "lm_hf")) == ["config.json", "model.safetensors"]
    export_hf(tmp_path / "lm" / "checkpoints", tmp_path / "lm_offline", tokenizer="offline")
    assert json.loads((tmp_path / "lm_offline" / "generation_config.json").read_text())["eos_token_id"] == 2
    with pytest.raises(FileNotFoundError, match="load_tokenizer reads local directories only"):
        export_hf(tmp_path / "lm" / "checkpoints", tmp_path / "lm_x", tokenizer=tmp_path / "no_such_tokenizer")
    assert not (tmp_path / "lm_x").exists()


def test_export_hf_sharded_round_trips_through_transformers_and_import_hf(tmp_path):
    """`export_hf(max_shard_size=)` writes shards and an index that transformers loads; `import_hf` of that
    directory (bf16 into float32) restores the run's weights exactly; an export interrupted while writing
    a shard leaves an earlier export there unchanged and no staging directory."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import rlhf_jax.models.hf as hf
    from rlhf_jax.checkpoint import Checkpointer
    from rlhf_jax.checkpoint_hf import export_hf, import_hf

    config = tiny_config(param_dtype="bfloat16", dtype="bfloat16")
    params = _run_dir(tmp_path / "run", config)
    out = tmp_path / "hf"
    export_hf(tmp_path / "run" / "checkpoints", out, max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and not (out / "model.safetensors").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    np.testing.assert_array_equal(model.lm_head.weight.detach().view(torch.int16).numpy().T,
                                  np.asarray(params["lm_head"]).view(np.int16))

    assert import_hf(out, tmp_path / "imported", dtype="float32") == 0
    with Checkpointer(tmp_path / "imported", read_only=True) as ckpt:
        assert ckpt.all_steps() == [0]
        assert ckpt.meta(0)["model_config"]["param_dtype"] == "float32"
    from rlhf_jax.train.weights import restore_item
    _assert_trees_bit_equal(restore_item(str(tmp_path / "imported"), "params", None),
                            jax.tree.map(lambda x: np.asarray(x).astype(np.float32), params))

    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    written = []

    def interrupted(tensors, file, target, *, caller):
        if written:
            raise KeyboardInterrupt("stopped while writing the second shard")
        written.append(file)
        hf.write_tensors.__wrapped__(tensors, file, target, caller=caller)

    interrupted.__wrapped__ = hf.write_tensors
    original, hf.write_tensors = hf.write_tensors, interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            export_hf(tmp_path / "run" / "checkpoints", out, overwrite=True, max_shard_size="60KB")
    finally:
        hf.write_tensors = original
    assert len(written) == 1
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["hf", "imported", "run"]
    with pytest.raises(ValueError, match=r"max_shard_size must be bytes or like '2GB'/'500MiB', got '2 gigs'"):
        export_hf(tmp_path / "run" / "checkpoints", tmp_path / "bad", max_shard_size="2 gigs")
    assert export_hf(tmp_path / "run" / "checkpoints", tmp_path / "bytes", max_shard_size="60000").step == 4
    assert (tmp_path / "bytes" / "model.safetensors.index.json").exists()


def test_import_hf_keeps_generation_config_ids_for_the_export(tmp_path):
    """An instruct model stops at several EOS ids listed only in generation_config.json (Qwen2.5's
    [151645, 151643], its pad id there too): import_hf records them, so export_hf writes them back
    and transformers' generate still stops at each; a generation_config.json id outside the vocabulary
    is refused naming the file."""
    from rlhf_jax.checkpoint import Checkpointer
    from rlhf_jax.checkpoint_hf import export_hf, import_hf

    config = tiny_config(model_type="qwen2", attention_bias=True, eos_token_id=5)
    save_hf(tmp_path / "hf", config, _random_params(config))
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7], "pad_token_id": 7}))
    import_hf(tmp_path / "hf", tmp_path / "run" / "checkpoints")
    with Checkpointer(tmp_path / "run" / "checkpoints", read_only=True) as ckpt:
        recorded = ckpt.meta(0)["model_config"]
    assert (recorded["eos_token_id"], recorded["pad_token_id"]) == ([5, 7], 7)
    export_hf(tmp_path / "run" / "checkpoints", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == {
        "eos_token_id": [5, 7], "pad_token_id": 7}

    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 256]}))
    with pytest.raises(HFCheckpointError, match=r"generation_config.json: eos_token_id must be a token id or a "
                                                r"list of them in the model's vocabulary of 256 ids, got \[5, 256\]"):
        import_hf(tmp_path / "hf", tmp_path / "run2" / "checkpoints")
    assert not (tmp_path / "run2").exists()


def test_single_file_wins_over_stray_safetensors_and_a_stale_index_as_in_transformers(ckpt, tmp_path):
    """transformers reads model.safetensors when it exists (else the index) and ignores other *.safetensors
    files beside it, e.g. the consolidated.safetensors of Mistral's own format that Mistral's repos ship."""
    save_file({"tok_embeddings.weight": np.zeros((256, 64), np.float32)}, ckpt.dir / "consolidated.safetensors")
    save_file({"base_model.model.lm_head.lora_A.weight": np.zeros((2, 64), np.float32)},
              ckpt.dir / "adapter_model.safetensors")
    sharded = save_hf(tmp_path / "sharded", ckpt.config.replace(eos_token_id=1), _random_params(ckpt.config, seed=1),
                      max_shard_size="60kB")
    for file in sharded.glob("model*.json"):  # a stale index and its shards, other weights
        os.replace(file, ckpt.dir / file.name)
    for file in sharded.glob("*.safetensors"):
        os.replace(file, ckpt.dir / file.name)
    config, params = load_hf(ckpt.dir)
    assert config == ckpt.config
    _assert_trees_bit_equal(params, ckpt.params)
    try:
        import torch
        import transformers
    except ImportError:
        return
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt.dir)
    np.testing.assert_array_equal(model.model.layers[1].mlp.down_proj.weight.detach().numpy(),
                                  np.asarray(params["layers"]["mlp"]["down_proj"][1]).T)
    assert torch.equal(model.lm_head.weight, torch.from_numpy(np.asarray(params["lm_head"]).T.copy()))


@pytest.mark.parametrize("model_type, keys", [("qwen2", dict(mlp_bias=True)), ("mistral", dict(mlp_bias=True)),
                                              ("qwen3", dict(mlp_bias=True, head_dim=16)),
                                              ("mistral", dict(attention_bias=True))])
def test_bias_keys_the_family_ignores_load_as_transformers_builds_them(model_type, keys):
    """mlp_bias / attention_bias only exist in the transformers classes that read them (llama; qwen3's
    attention_bias): elsewhere the key is ignored, so the checkpoint loads with the family's layout."""
    d = {"model_type": model_type, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, **keys}
    config = config_from_hf(d)
    assert config == config_from_hf({k: v for k, v in d.items() if k not in keys or k == "head_dim"})
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in d.items() if k != "model_type"})
    theirs = {name for name, _ in transformers.AutoModelForCausalLM.from_config(hf_config).named_parameters()}
    assert ({"model.layers.0.mlp.up_proj.bias", "model.layers.0.self_attn.o_proj.bias"} & theirs) == set()
    assert ("model.layers.0.self_attn.q_proj.bias" in theirs) == config.attention_bias
