"""LoRA adapters <-> PEFT: adapters trained here load into `peft.PeftModel` on the transformers model
(and PEFT's into ours) with logits within 1e-4, on tiny Llama (untied) and Qwen2 (tied, q/k/v bias)
models, every target (q, k, v, o, gate, up, down, embed, lm_head) adapted. PEFT and torch are
test-time references only (`pip install -e '.[test]'`)."""

import json
import os
import re
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from step_fixtures import FAST_COMPILE, sft_batches, single_device_mesh

from rlhf_jax.models import CausalLM
from rlhf_jax.models.hf import HFCheckpointError, load_hf
from rlhf_jax.models.lora import TARGETS, LoraConfig, LoraLM
from rlhf_jax.models.lora import base_params as base_params_of
from rlhf_jax.models.lora_peft import ADAPTER_CONFIG, load_peft, save_peft
from rlhf_jax.optim import OptimizerConfig, make_optimizer
from rlhf_jax.state import train_state_from_params
from rlhf_jax.steps import SFT_KEYS, jit_model_step, make_sft_step

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)
CASES = {"llama": ("LlamaConfig", False), "qwen2-tied": ("Qwen2Config", True)}
PEFT_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]
TOKENS = np.random.default_rng(0).integers(1, 256, (3, 12))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """A tiny random transformers model saved as a Hugging Face directory, and our copy of it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cls, tied = CASES[request.param]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, cls)(**COMMON, tie_word_embeddings=tied), attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen) + (1.0 if name.endswith("norm.weight") else 0.0))
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root / "base")
    config, params = load_hf(root / "base")
    return types.SimpleNamespace(name=request.param, torch=torch, transformers=transformers, peft=peft, root=root,
                                 config=config, params=params)


def _fresh_hf(case):
    return case.transformers.AutoModelForCausalLM.from_pretrained(case.root / "base",
                                                                   attn_implementation="eager").eval()


def _peft_logits(case, model):
    with case.torch.no_grad():
        return model(input_ids=case.torch.tensor(TOKENS)).logits.float().numpy()


def _train_adapters(lm, params, steps=3):
    """A few SFT steps (lr 1e-2) so that A and B both move away from their initial values."""
    optim = OptimizerConfig(learning_rate=1e-2, max_grad_norm=None)
    mesh = single_device_mesh()
    state = train_state_from_params(params, make_optimizer(optim), rng=0, logical_axes=lm.logical_axes, mesh=mesh,
                                    strategy="dp")
    step = jit_model_step(make_sft_step(lm, optim), lm, optim, mesh=mesh, strategy="dp", batch_keys=SFT_KEYS)
    batches = sft_batches(steps)
    compiled = step.lower(state, batches[0]).compile(compiler_options=FAST_COMPILE)
    for batch in batches:
        state, _ = compiled(state, batch)
    return state.params


def test_adapters_trained_here_load_into_peft(case):
    lora = LoraConfig(rank=4, alpha=8.0, targets=TARGETS, dropout=0.05)
    lm = LoraLM(CausalLM(case.config), lora)
    params = _train_adapters(lm, jax.tree.map(np.asarray, lm.init_from_base(case.params, jax.random.key(0))))
    assert float(np.abs(np.asarray(params["lora"]["layers"]["q"]["b"])).max()) > 1e-3  # B trained
    out = save_peft(case.root / "ours", case.config, lora, params["lora"], base_model_name_or_path=str(case.root))
    saved = json.loads((out / ADAPTER_CONFIG).read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8.0 and sorted(saved["target_modules"]) == sorted(PEFT_NAMES)

    model = case.peft.PeftModel.from_pretrained(_fresh_hf(case), out).eval()
    ref = _peft_logits(case, model)
    ours = np.asarray(jax.jit(lm.forward)(params, TOKENS).logits)
    base = _peft_logits(case, _fresh_hf(case))
    assert np.abs(ref - base).max() > 1e-2  # PEFT applied the adapters
    assert np.abs(ours - ref).max() <= 1e-4, f"{case.name}: max |Δ logit| = {np.abs(ours - ref).max()}"
    # Our own loader reads it back exactly.
    found, adapters, head = load_peft(out, case.config, lora=lora)
    assert found == lora and head is None
    for got, want in zip(jax.tree.leaves(adapters), jax.tree.leaves(params["lora"])):
        np.testing.assert_array_equal(got, np.asarray(want))


def test_adapters_made_by_peft_load_here(case):
    peft = case.peft
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_NAMES, use_rslora=True,
                             init_lora_weights=False)  # random A and B, so every tensor matters
    model = peft.get_peft_model(_fresh_hf(case), config).eval()
    model.save_pretrained(case.root / "theirs")
    ref = _peft_logits(case, model)

    lora, adapters, _ = load_peft(case.root / "theirs", case.config)
    assert lora == LoraConfig(rank=4, alpha=8.0, use_rslora=True, targets=TARGETS)
    lm = LoraLM(CausalLM(case.config), lora)
    ours = np.asarray(jax.jit(lm.forward)(lm.init_from_base(case.params, None, adapters), TOKENS).logits)
    assert np.abs(ours - ref).max() <= 1e-4, f"{case.name}: max |Δ logit| = {np.abs(ours - ref).max()}"


def test_bad_adapters_name_the_tensor_and_both_shapes(case, tmp_path):
    lora = LoraConfig(rank=4, targets=("q", "down"))
    lm = LoraLM(CausalLM(case.config), lora)
    path = save_peft(tmp_path / "a", case.config, lora, lm.init_adapters(jax.random.key(0)))
    other = case.config.replace(hidden_size=96)
    with pytest.raises(HFCheckpointError, match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight: the file has shape "
                                                r"\(4, 64\), the model expects \(4, 96\)"):
        load_peft(path, other)
    with pytest.raises(HFCheckpointError, match=r"layers\.2\.mlp\.down_proj\.lora_A\.weight: missing"):
        load_peft(path, case.config.replace(num_layers=3))
    with pytest.raises(HFCheckpointError, match=r"rank: .* has 4, this run 8"):
        load_peft(path, case.config, lora=LoraConfig(rank=8, targets=("q", "down")))
    raw = json.loads((path / ADAPTER_CONFIG).read_text())
    (path / ADAPTER_CONFIG).write_text(json.dumps({**raw, "use_dora": True}))
    with pytest.raises(HFCheckpointError, match=r"use_dora=True is not supported"):
        load_peft(path, case.config)


def test_reward_model_adapters_and_score_head_load_into_peft_seq_cls(tmp_path):
    """A scalar-head model's adapters plus its trained score head: PEFT's SEQ_CLS adapter (score as a
    module to save) on `AutoModelForSequenceClassification` gives our reward within 1e-4."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from rlhf_jax.models.hf import save_hf
    from rlhf_jax.testing import tiny_config

    config = tiny_config()
    lm = LoraLM(CausalLM(config, head="scalar"), LoraConfig(rank=4, targets=("q", "v", "up", "down", "embed")))
    params = lm.init(jax.random.key(0))
    params["lora"] = jax.tree.map(lambda x: 0.2 * jax.random.normal(jax.random.key(x.size), x.shape), params["lora"])
    params["score"] = params["score"] + 0.3  # trained beside the adapters
    save_hf(tmp_path / "base", config, CausalLM(config, head="scalar").init(jax.random.key(0)))
    save_peft(tmp_path / "adapters", config, lm.lora, params["lora"], head_params={"score": params["score"]})
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval(),
        tmp_path / "adapters").eval()
    tokens = TOKENS[:1]  # transformers' sequence classifier needs a pad id for batches > 1
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens)).logits[:, 0].numpy()
    ours = np.asarray(lm.forward(params, tokens).values)[:, -1]
    base = np.asarray(CausalLM(config, head="scalar").forward(base_params_of(params), tokens).values)[:, -1]
    assert abs(float(ref[0]) - float(ours[0])) <= 1e-4 and abs(float(ours[0]) - float(base[0])) > 1e-2


def test_damaged_adapter_directories_name_the_file_and_key(tmp_path):
    """A PEFT directory whose config is unreadable, mistyped or disagrees with its weights, or whose
    weights are truncated or not floating, raises HFCheckpointError naming the file (and the key or
    tensor); nothing is coerced (`"false"` is not true) or loaded in part."""
    import os
    import shutil

    from safetensors.numpy import load_file
    from safetensors.numpy import save_file as save_tensors

    from rlhf_jax.models.lora_peft import ADAPTER_WEIGHTS
    from rlhf_jax.testing import tiny_config

    config = tiny_config()
    lora = LoraConfig(rank=4, targets=("q", "down"))
    good = save_peft(tmp_path / "good", config, lora, LoraLM(CausalLM(config), lora).init_adapters(jax.random.key(0)))
    raw = json.loads((good / ADAPTER_CONFIG).read_text())
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def edit_config(d, change=(), drop=()):
        (d / ADAPTER_CONFIG).write_text(json.dumps({**{k: v for k, v in raw.items() if k not in drop}, **dict(change)}))

    def edit_weights(d, fn):
        tensors = load_file(d / ADAPTER_WEIGHTS)
        fn(tensors)
        save_tensors(tensors, str(d / ADAPTER_WEIGHTS))

    cases = [
        (lambda d: (d / ADAPTER_CONFIG).write_text("{x"), ADAPTER_CONFIG, "not readable JSON"),
        (lambda d: (d / ADAPTER_CONFIG).write_text("[]"), ADAPTER_CONFIG, "expected a JSON object, got list"),
        (lambda d: edit_config(d, drop=["r"]), ADAPTER_CONFIG, "r must be a positive integer, got None"),
        (lambda d: edit_config(d, {"r": "four"}), ADAPTER_CONFIG, "r must be a positive integer, got 'four'"),
        (lambda d: edit_config(d, drop=["lora_alpha"]), ADAPTER_CONFIG, "lora_alpha must be a number, got None"),
        (lambda d: edit_config(d, {"lora_dropout": "x"}), ADAPTER_CONFIG, "lora_dropout must be a number"),
        (lambda d: edit_config(d, {"use_rslora": "false"}), ADAPTER_CONFIG, "use_rslora must be true or false"),
        (lambda d: edit_config(d, {"target_modules": ["v_proj"]}), ADAPTER_CONFIG,
         "listed without weights: ['v_proj']; weights not listed: ['down_proj', 'q_proj']"),
        (lambda d: edit_weights(d, lambda t: [t.pop(n) for n in list(t) if "q_proj" in n]), ADAPTER_CONFIG,
         "listed without weights: ['q_proj']"),
        (lambda d: (d / ADAPTER_WEIGHTS).write_bytes((d / ADAPTER_WEIGHTS).read_bytes()[:-10]), ADAPTER_WEIGHTS,
         "not a readable safetensors file"),
        (lambda d: edit_weights(d, lambda t: t.update({q_a: t[q_a].astype(np.int32)})), ADAPTER_WEIGHTS,
         f"{q_a}: the file has dtype I32, the model expects a floating dtype"),
    ]
    for i, (damage, file, message) in enumerate(cases):
        d = tmp_path / f"case{i}"
        shutil.copytree(good, d)
        damage(d)
        with pytest.raises(HFCheckpointError) as err:
            load_peft(d, config)
        assert str(d / file) in str(err.value) and message in str(err.value), (i, str(err.value))

    # A regex target_modules (as PEFT may save it) is not compared with the weights.
    shutil.copytree(good, tmp_path / "regex")
    edit_config(tmp_path / "regex", {"target_modules": ".*(q|down)_proj"})
    assert set(load_peft(tmp_path / "regex", config)[0].targets) == {"q", "down"}

    # Overwriting an export publishes the new one whole, with the umask's permissions (not mkdtemp's 0700).
    umask = os.umask(0o022)
    try:
        save_peft(good, config, lora, LoraLM(CausalLM(config), lora).init_adapters(jax.random.key(1)), overwrite=True)
    finally:
        os.umask(umask)
    assert os.stat(good).st_mode & 0o777 == 0o755
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_save_refuses_adapters_that_do_not_fit_and_load_takes_peft_spellings(tmp_path):
    """save_peft of adapters that do not match `lora` (another rank: reshaped into garbage; a target
    missing from `lora`: silently dropped) is a ValueError and writes nothing. load_peft accepts what
    PEFT accepts: a target_modules list with a name no module has (PEFT skips it when another name
    matches), and names a modules_to_save full copy as such."""
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file as save_tensors

    from rlhf_jax.models.lora_peft import ADAPTER_WEIGHTS
    from rlhf_jax.testing import tiny_config

    config = tiny_config()
    rank8 = LoraLM(CausalLM(config), LoraConfig(rank=8, targets=("q", "v"))).init_adapters(jax.random.key(0))
    with pytest.raises(ValueError, match=r"save_peft: the adapters do not fit the lora config \(rank 4, targets "
                                         r"\['q', 'v'\]\) on this model: q\.a: shape \(2, 64, 8\), expected "
                                         r"\(2, 64, 4\)"):
        save_peft(tmp_path / "rank", config, LoraConfig(rank=4, targets=("q", "v")), rank8)
    with pytest.raises(ValueError, match=r"on this model: v: not a target of this config$"):
        save_peft(tmp_path / "dropped", config, LoraConfig(rank=8, targets=("q",)), rank8)
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    lora = LoraConfig(rank=8, targets=("q", "v"))
    out = save_peft(tmp_path / "ok", config, lora, rank8)
    raw = json.loads((out / ADAPTER_CONFIG).read_text())
    (out / ADAPTER_CONFIG).write_text(json.dumps({**raw, "target_modules": ["q_proj", "v_proj", "c_attn"]}))
    found, adapters, _ = load_peft(out, config)
    assert found == lora
    for got, want in zip(jax.tree.leaves(adapters), jax.tree.leaves(rank8)):
        np.testing.assert_array_equal(got, np.asarray(want))

    (out / ADAPTER_CONFIG).write_text(json.dumps({**raw, "modules_to_save": ["lm_head"]}))
    tensors = load_file(out / ADAPTER_WEIGHTS)
    save_tensors({**tensors, "base_model.model.lm_head.weight": np.zeros((256, 64), np.float32)},
                 str(out / ADAPTER_WEIGHTS))
    with pytest.raises(HFCheckpointError, match=r"tensor 'base_model\.model\.lm_head\.weight' is a full copy of a "
                                                r"module \(modules_to_save \['lm_head'\]\), not a LoRA adapter"):
        load_peft(out, config)


def test_export_hf_of_a_lora_run_loads_into_peft_and_merged_with_the_runs_tokenizer(case, tmp_path):
    """`export_hf` of a LoRA run's checkpoint from Python: its adapters (PEFT format, the run's tokenizer
    saved with them) on the base in `peft.PeftModel`, and the merged model in transformers, give our
    log-probs within 1e-5 (Llama untied; Qwen2 tied with q/k/v bias). A tokenizer that fails to save
    while an earlier export is being replaced leaves that export as it was and nothing else."""
    from rlhf_jax.checkpoint import Checkpointer
    from rlhf_jax.checkpoint_hf import export_hf
    from rlhf_jax.config import CheckpointConfig
    from rlhf_jax.logprobs import token_logprobs
    from rlhf_jax.testing import save_offline_tokenizer
    from rlhf_jax.train.adapters import params_items

    transformers, peft = case.transformers, case.peft
    lm = LoraLM(CausalLM(case.config), LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "up", "down")))
    params = lm.init_from_base(case.params, jax.random.key(0))
    params["lora"] = jax.tree.map(lambda x: 0.1 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype),
                                  params["lora"])  # B != 0: the adapters matter
    run = tmp_path / "run"
    with Checkpointer(run / "checkpoints", config=CheckpointConfig(async_save=False), model_config=case.config) as ck:
        ck.save(5, params_items(lm, params))
    save_offline_tokenizer(run / "tokenizer")
    assert export_hf(run / "checkpoints", tmp_path / "adapters").step == 5
    assert export_hf(run / "checkpoints", tmp_path / "merged", merge=True).step == 5
    assert sorted(os.listdir(tmp_path / "adapters")) == [
        ADAPTER_CONFIG, "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "adapters").pad_token_id == 0

    labels = TOKENS[:, 1:]
    ours = np.asarray(token_logprobs(jax.jit(lm.forward)(params, TOKENS).logits[:, :-1], labels))
    base = np.asarray(token_logprobs(CausalLM(case.config).forward(case.params, TOKENS).logits[:, :-1], labels))
    assert np.abs(ours - base).max() > 1e-2
    for model in (peft.PeftModel.from_pretrained(_fresh_hf(case), tmp_path / "adapters").eval(),
                  transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()):
        theirs = np.asarray(token_logprobs(_peft_logits(case, model)[:, :-1], labels))
        assert np.abs(ours - theirs).max() <= 1e-5
    assert json.loads((tmp_path / "adapters" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] is None

    # A run that started from a Hugging Face directory (its config.json's checkpoint.init_from) names it as
    # the adapters' base, so PEFT's Auto class finds the base by itself.
    (run / "config.json").write_text(json.dumps({"checkpoint": {"init_from": str(case.root / "base")}}))
    export_hf(run / "checkpoints", tmp_path / "adapters", overwrite=True)
    assert (json.loads((tmp_path / "adapters" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
            == os.path.abspath(case.root / "base"))
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapters", attn_implementation="eager").eval()
    assert np.abs(ours - np.asarray(token_logprobs(_peft_logits(case, auto)[:, :-1], labels))).max() <= 1e-5

    class FailingTokenizer:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def save_pretrained(self, directory):
            (Path(directory) / "tokenizer.json").write_text("{")
            raise OSError("disk full")

    before = {f: (tmp_path / "adapters" / f).read_bytes() for f in os.listdir(tmp_path / "adapters")}
    with pytest.raises(OSError, match="disk full"):
        export_hf(run / "checkpoints", tmp_path / "adapters", tokenizer=FailingTokenizer(), overwrite=True)
    assert {f: (tmp_path / "adapters" / f).read_bytes() for f in os.listdir(tmp_path / "adapters")} == before
    assert sorted(os.listdir(tmp_path)) == ["adapters", "merged", "run"]


def test_adapters_over_a_changed_base_or_with_other_math_are_refused_by_key(tmp_path):
    """PEFT options that make the saved A, B mean something else than y = x·W + s·(x·A)·B on the base
    model's W are refused naming the key: PiSSA / OLoRA / LoftQ ... initialisations (PEFT subtracts the
    initial adapters from W and recomputes that residual when it loads them; read as plain LoRA they
    were off by 0.24 in the logits of a tiny Llama), activated LoRA, trained token rows, replicated
    layers, parameter targets. Plain initialisations still load."""
    import shutil

    from rlhf_jax.testing import tiny_config

    config = tiny_config()
    lora = LoraConfig(rank=4, targets=("q", "down"))
    good = save_peft(tmp_path / "good", config, lora, LoraLM(CausalLM(config), lora).init_adapters(jax.random.key(0)))
    raw = json.loads((good / ADAPTER_CONFIG).read_text())
    cases = {"init_lora_weights": ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"],
             "alora_invocation_tokens": [[5, 6]], "trainable_token_indices": [[3, 4]],
             "layer_replication": [[[0, 2], [0, 2]]], "target_parameters": [["mlp.experts.down_proj"]],
             "kasa_config": [{"x": 1}], "use_dora": [True], "rank_pattern": [{"q_proj": 8}]}
    for key, values in cases.items():
        for value in values:
            (good / ADAPTER_CONFIG).write_text(json.dumps({**raw, key: value}))
            with pytest.raises(HFCheckpointError, match=rf"adapter_config\.json: {key}={re.escape(repr(value))} is "
                                                        r"not supported"):
                load_peft(good, config)
    for key, value in (("init_lora_weights", "gaussian"), ("init_lora_weights", False), ("init_lora_weights", "eva"),
                       ("target_parameters", []), ("trainable_token_indices", None), ("velora_config", {"x": 1})):
        d = tmp_path / f"ok_{key}_{value}"
        shutil.copytree(good, d)
        (d / ADAPTER_CONFIG).write_text(json.dumps({**raw, key: value}))
        assert load_peft(d, config)[0] == lora

