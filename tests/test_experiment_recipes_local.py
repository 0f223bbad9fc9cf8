"""The real-model experiments run as a user tries them on a small local checkpoint before the pod.

Tiny Hugging Face checkpoints are built here (transformers + a BPE tokenizer trained with `tokenizers`,
no download): a Qwen2 model with q/k/v biases and the Qwen2.5 chat template, a Llama model with
Llama 3's `rope_type: llama3` scaling and the Llama 3.1 chat template (no pad token), tied and untied
embeddings. Each recipe runs through `rlhf-jax run` with `--set` overrides pointing at those files and
shrinking the run (the model's shapes set to the checkpoint's, float32 compute); the loaded model's
log-probs are compared with transformers', the prompts with the tokenizer's chat template, and the
export with the trained weights. The DPO run on Qwen and the early refusal are in the default suite;
the Llama LoRA, GRPO and PPO recipes are opt-in (`RLHF_JAX_FULL_EXPERIMENTS=1`, tests/test_experiments_full.py).
"""

import json
import os

import numpy as np
import pytest

from rlhf_jax.cli import experiment_config, load_experiment, main
from rlhf_jax.train.data import eval_batches, load_run_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = pytest.mark.skipif(os.environ.get("RLHF_JAX_FULL_EXPERIMENTS") != "1",
                          reason="the other real-model recipes on local checkpoints are opt-in: set RLHF_JAX_FULL_EXPERIMENTS=1")

# The public chat formats (no tools branch): Qwen2.5's default system turn, Llama 3.1's dated system header.
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if message.role == 'user' "
    "or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}{{- '<|im_start|>' + "
    "message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA31 = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: 26 Jul 2024\\n\\n' + system_message + '<|eot_id|>' }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
_CORPUS = ["You are Qwen, created by Alibaba Cloud. You are a helpful assistant. system user assistant",
           "Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024",
           "What is 3+4? The answer is 7. bad Tom has 3 apples and gets 4 more. How many? #### 7 0123456789"] * 20
_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
VOCAB = 320  # the model's rows: the tokenizer's 300 ids and unused padding rows, as Qwen's checkpoints have
SHAPES = ["model.vocab_size=320", "model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2",
          "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=16", "model.dtype=float32"]


def _tokenizer(family):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if family == "qwen2" else
                ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    options = (dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN25) if family == "qwen2" else
               dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA31))  # no pad token
    return PreTrainedTokenizerFast(tokenizer_object=backend, **options)


def _checkpoint(path, family, *, tie):
    """A random tiny checkpoint of `family` with its tokenizer at `path`; returns the set-overrides matching it."""
    import torch
    import transformers

    tok = _tokenizer(family)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tie)
    if family == "qwen2":
        ids = dict(bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, **ids, rope_theta=1e6, rms_norm_eps=1e-6))
        sets = [f"model.bos_token_id={ids['bos_token_id']}", f"model.eos_token_id={ids['eos_token_id']}"]
    else:  # Llama-3.1-8B-Instruct's stops: <|end_of_text|>, <|eot_id|>; its RoPE scaling at a small original length
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=[tok.convert_tokens_to_ids("<|end_of_text|>"), tok.eos_token_id])
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, **ids, rope_theta=5e5, rms_norm_eps=1e-5,
                                                                       rope_scaling=rope))
        sets = [f"model.bos_token_id={ids['bos_token_id']}", "model.eos_token_id=" + ",".join(map(str, ids["eos_token_id"])),
                "model.rope_scaling.original_max_position_embeddings=64"]
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial biases and norms
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.1) + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return [*SHAPES, f"model.tie_word_embeddings={str(tie).lower()}", *sets]


def _preference_rows(path, n, seed):
    """UltraFeedback-binarized rows (shared-prefix conversations) and TRL's explicit prompt/chosen/rejected rows."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = (int(x) for x in rng.integers(0, 10, 2))
            user = {"role": "user", "content": f"What is {a}+{b}?"}
            good, bad = ({"role": "assistant", "content": text} for text in (f"The answer is {a + b}.", "bad"))
            row = ({"prompt": user["content"], "chosen": [user, good], "rejected": [user, bad]} if i % 2 else
                   {"prompt": [user], "chosen": [good], "rejected": [bad]})
            f.write(json.dumps(row) + "\n")
    return path


def _hf_completion_logps(model, tokens, mask):
    """Sum over the masked tokens of log p(token | before), by transformers (float64 softmax)."""
    import torch

    end = int(len(mask) - np.argmax(mask[::-1]))
    ids = torch.tensor([[int(t) for t in tokens[:end]]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    picked = logp[:-1].gather(-1, ids[0, 1:, None])[:, 0]
    return float((picked * torch.tensor(np.asarray(mask[1:end], np.float64))).sum())


def _sets(values):
    return [a for v in values for a in ("--set", v)]


def _dpo_run(tmp_path, experiment, family, *, tie, extra=()):
    """DPO of `experiment` on a local tiny checkpoint: (step-0 and final held-out chosen log-probs by transformers
    from the checkpoint and the export, the run's metrics, the export directory, the eval batch, the tokenizer)."""
    import transformers

    hf = str(tmp_path / "model")
    overrides = _checkpoint(hf, family, tie=tie)
    train, test = (_preference_rows(str(tmp_path / f"{s}.jsonl"), n, seed) for s, n, seed in (("train", 32, 0), ("test", 8, 1)))
    run = tmp_path / "run"
    sets = [f"workdir={run}", f"data.train={train}", f"data.eval={test}", f"data.tokenizer={hf}",
            f"checkpoint.init_from={hf}", "train.steps=2", "data.batch_size=16", "data.max_len=192",
            "data.max_prompt_len=160", "train.eval_every=2", "train.eval_batches=1", "train.micro_batches=2",
            "checkpoint.every=2", "logging.every=1", "logging.console=false", "logging.tensorboard=false",
            "optim.learning_rate=1e-3", "optim.warmup_steps=0", *overrides, *extra]
    spec = os.path.join(ROOT, "experiments", experiment)
    module, arg = load_experiment(spec)
    config = experiment_config(module, arg, sets)
    batch = eval_batches(load_run_data(config, "preference").eval, config.data, max_batches=1)[0]
    assert main(["run", spec, *_sets(sets)]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    out = tmp_path / "export"
    assert main(["export", str(run), str(out)]) == 0
    return hf, metrics, out, batch, transformers.AutoTokenizer.from_pretrained(hf)


def _held_out_logps(model, batch):
    rows = range(int(np.sum(batch["example_mask"])))
    return float(np.mean([_hf_completion_logps(model, batch["chosen_tokens"][i], batch["chosen_loss_mask"][i]) for i in rows]))


def _eval_logps(metrics, step):
    return [m["eval/logps/chosen"] for m in metrics if m["step"] == step and "eval/logps/chosen" in m][-1]


def test_dpo_qwen_recipe_loads_trains_and_exports_a_local_qwen_checkpoint(tmp_path):
    """dpo_qwen2_5_0_5b on a tiny Qwen2 checkpoint (q/k/v biases, tied embeddings, Qwen2.5 template): rows
    rendered by the tokenizer's template (TRL's prompt / completion split, no "\\n" after the final
    <|im_end|>), the loaded model's held-out log-probs equal transformers' on the checkpoint, the trained
    policy moves, and its export loads in transformers with the run's log-probs and the checkpoint's ids."""
    import torch
    import transformers

    hf, metrics, out, batch, tok = _dpo_run(tmp_path, "dpo_qwen2_5_0_5b.py", "qwen2", tie=True)
    rows = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    for i in range(2):  # a shared-prefix row and an explicit-prompt row
        row = rows[i]
        messages = (row["chosen"] if isinstance(row["prompt"], str) else row["prompt"] + row["chosen"])
        whole = tok.apply_chat_template(messages, return_dict=True)["input_ids"]
        prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
        ids, mask = [int(t) for t in batch["chosen_tokens"][i]], batch["chosen_loss_mask"][i]
        start, end = int(np.argmax(mask)), int(len(mask) - np.argmax(mask[::-1]))
        assert ids[:start] == prompt and ids[:end] == whole[:-1] and tok.decode(whole[-1:]) == "\n"
    source = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    np.testing.assert_allclose(_eval_logps(metrics, 0), _held_out_logps(source, batch), rtol=1e-5, atol=1e-4)
    assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    np.testing.assert_allclose(_eval_logps(metrics, 2), _held_out_logps(exported, batch), rtol=1e-5, atol=1e-4)
    assert _eval_logps(metrics, 2) > _eval_logps(metrics, 0) + 1.0  # the policy moved toward the chosen answers
    assert exported.config.tie_word_embeddings and exported.generation_config.eos_token_id == tok.eos_token_id
    assert (exported.config.bos_token_id, exported.config.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert transformers.AutoTokenizer.from_pretrained(str(out)).chat_template == QWEN25


def test_preset_token_ids_outside_a_local_checkpoint_are_refused_before_training(tmp_path, capsys):
    """A user who sets the model's shapes to a small checkpoint's but leaves the preset's BOS/EOS ids
    (151643, 151645) was told only by `rlhf-jax export`, after training, that they lie outside the
    vocabulary; the run now refuses them before anything is compiled, naming the key to set."""
    hf = str(tmp_path / "model")
    overrides = [s for s in _checkpoint(hf, "qwen2", tie=True) if "token_id" not in s]
    data = _preference_rows(str(tmp_path / "train.jsonl"), 8, 0)
    run = tmp_path / "run"
    code = main(["run", os.path.join(ROOT, "experiments", "dpo_qwen2_5_0_5b.py"),
                 *_sets([f"workdir={run}", f"data.train={data}", "data.eval=none", f"data.tokenizer={hf}",
                         f"checkpoint.init_from={hf}", "data.batch_size=8", *overrides])])
    assert code == 2 and not run.exists()
    assert capsys.readouterr().err.strip().endswith(
        "error: model.bos_token_id=151643 is outside the model's vocabulary [0, model.vocab_size=320): set "
        "model.bos_token_id to the checkpoint's (its config.json), or none to take the tokenizer's")


@pytest.mark.parametrize("name, ids", [
    ("dpo_qwen2_5_0_5b", (151643, 151645)), ("grpo_qwen2_5_1_5b_gsm8k", (151643, 151645)),
    ("ppo_qwen2_5_1_5b", (151643, 151645)), ("dpo_llama3_8b", (128000, (128001, 128008, 128009))),
    ("dpo_llama3_8b_lora", (128000, (128001, 128008, 128009)))])
def test_pod_configs_carry_their_instruct_checkpoints_token_ids(name, ids):
    """The exports write the run's ids into config.json: they are the -Instruct checkpoints' (Qwen2.5's
    <|im_end|>; Llama 3.1's three stops), not the base presets' (<|endoftext|>; <|end_of_text|> only)."""
    module, _ = load_experiment(os.path.join(ROOT, "experiments", f"{name}.py"))
    modes = ("lora", "qlora", "full") if name.endswith("lora") else ("full",)
    for mode in modes:
        model = module.get_config(mode).model
        assert (model.bos_token_id, model.eos_token_id) == ids


@FULL
def test_dpo_llama3_lora_recipe_on_a_local_llama3_checkpoint_exports_peft_adapters(tmp_path):
    """dpo_llama3_8b_lora on a tiny untied Llama with llama3 RoPE scaling and the Llama 3.1 template (no pad
    token), LoRA rank 4 by --set: log-probs as transformers', the adapters load in PEFT with the run's log-probs."""
    import peft
    import torch
    import transformers

    hf, metrics, out, batch, tok = _dpo_run(tmp_path, "dpo_llama3_8b_lora.py", "llama", tie=False,
                                            extra=("model.param_dtype=float32", "lora.rank=4", "lora.alpha=8"))
    assert tok.decode(batch["chosen_tokens"][0][:1]) == "<|begin_of_text|>"
    base = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    np.testing.assert_allclose(_eval_logps(metrics, 0), _held_out_logps(base, batch), rtol=1e-5, atol=1e-4)
    adapted = peft.PeftModel.from_pretrained(base, str(out))
    assert adapted.peft_config["default"].r == 4 and adapted.peft_config["default"].lora_alpha == 8
    np.testing.assert_allclose(_eval_logps(metrics, 2), _held_out_logps(adapted, batch), rtol=1e-5, atol=1e-4)
    assert _eval_logps(metrics, 2) != _eval_logps(metrics, 0)


@FULL
@pytest.mark.parametrize("experiment", ["grpo_qwen2_5_1_5b_gsm8k", "ppo_qwen2_5_1_5b"])
def test_rl_recipes_on_a_local_qwen_checkpoint(tmp_path, experiment):
    """GRPO (GSM8K rows, math verifier) and PPO (a local Qwen2ForSequenceClassification reward model and critic):
    prompts rendered by the tokenizer's template, completions stop at <|im_end|>, the policy trains and exports."""
    import torch
    import transformers

    hf = str(tmp_path / "model")
    overrides = _checkpoint(hf, "qwen2", tie=False)
    rng = np.random.default_rng(0)
    rows = [(int(a), int(b)) for a, b in rng.integers(0, 10, (16, 2))]
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for a, b in rows:
            f.write(json.dumps({"question": f"Tom has {a} apples and gets {b} more. How many?",
                                "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} if experiment.startswith("grpo") else
                               {"prompt": f"What is {a}+{b}?"}) + "\n")
    if experiment.startswith("ppo"):
        rm = transformers.AutoModelForSequenceClassification.from_config(
            transformers.AutoConfig.from_pretrained(hf, num_labels=1, pad_token_id=_tokenizer("qwen2").pad_token_id))
        rm.save_pretrained(tmp_path / "rm")
        _tokenizer("qwen2").save_pretrained(tmp_path / "rm")
        overrides += [f"rewards.reward_model={tmp_path / 'rm'}", "algorithm.num_minibatches=1", "algorithm.micro_batches=1",
                      "rewards.reward_model_batch_size=8"]
    else:
        overrides += ["algorithm.group_size=2", "algorithm.micro_batches=2"]
    run, prompts = tmp_path / "run", str(tmp_path / "prompts.jsonl")
    sets = [f"workdir={run}", f"data.train={prompts}", f"data.eval={prompts}", f"data.tokenizer={hf}",
            f"checkpoint.init_from={hf}", "train.steps=2", "data.batch_size=8", "data.max_len=144",
            "data.max_prompt_len=128", "rollout.max_new_tokens=16", "rollout.sampler_dtype=float32", "train.eval_every=2",
            "train.eval_batches=1", "checkpoint.every=2", "logging.console=false", "logging.tensorboard=false",
            "optim.learning_rate=1e-3", "optim.warmup_steps=0", *overrides]
    spec = os.path.join(ROOT, "experiments", f"{experiment}.py")
    module, arg = load_experiment(spec)
    config = experiment_config(module, arg, sets)
    batch = eval_batches(load_run_data(config, "prompt").eval, config.data, max_batches=1)[0]
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    question = json.loads(open(prompts).readline())
    message = {"role": "user", "content": question.get("question", question.get("prompt"))}
    assert [int(t) for t in batch["prompt_tokens"][0][: batch["prompt_lengths"][0]]] == \
        tok.apply_chat_template([message], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert main(["run", spec, *_sets(sets)]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss" in m]
    assert len(train) == 2 and all(np.isfinite(m["loss"]) for m in train)
    assert all(m["sampler_logprob_diff/max"] < 1e-4 for m in train)  # float32 sampler = the trainer's log-probs
    assert all(m["completions/mean_length"] <= 16 for m in train)
    assert main(["export", str(run), str(tmp_path / "export")]) == 0
    before = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).state_dict()
    after = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), dtype=torch.float32).state_dict()
    assert max(float((before[k] - after[k]).abs().max()) for k in before) > 1e-5


def test_grpo_tiny_mode_reads_a_data_path_given_with_set(tmp_path, monkeypatch):
    """grpo_qwen2_5_1_5b_gsm8k:tiny writes its GSM8K-format files for the splits still at `<run_dir>/...`;
    a split the user points at their own file is read from it (`data.eval` used to be replaced too)."""
    module, _ = load_experiment(os.path.join(ROOT, "experiments", "grpo_qwen2_5_1_5b_gsm8k.py"))
    mine = str(tmp_path / "my_test.jsonl")
    seen = []
    monkeypatch.setattr(module.rl, "train", lambda config: seen.append(config.data) or {})
    for sets in ([f"data.eval={mine}"], [f"data.train={mine}"], ["data.eval=none"]):
        module.main(experiment_config(module, "tiny", [f"workdir={tmp_path / 'w'}", *sets]))
    written = str(tmp_path / "w" / "data" / "train.jsonl"), str(tmp_path / "w" / "data" / "test.jsonl")
    assert [(d.train, d.eval) for d in seen] == [(written[0], mine), (mine, written[1]), (written[0], None)]
