"""What a run's console says about its evaluations: the held-out share each `eval @ step N` line reports,
for an SFT run and a reward-model run, and the counts `held_out_batches` takes them from."""

import dataclasses
import re

from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
from rlhf_jax.train import reward_model, sft
from rlhf_jax.train import tiny_stages as tiny
from rlhf_jax.train.data import held_out_batches, load_split, make_tokenizer
from rlhf_jax.train.run_config import DataConfig

_ONE_STEP = dict(checkpoint=CheckpointConfig(every=0, keep=1, async_save=False),
                 logging=LoggingConfig(every=1, tensorboard=False))


def _eval_lines(err: str) -> list[str]:
    return [line.strip() for line in err.replace("\r", "\n").splitlines() if line.strip().startswith("eval @ step")]


def test_held_out_batches_count_the_examples_they_hold_packed_or_padded():
    """Packed rows count by their examples; the padding rows of a last, partial batch do not count."""
    data = DataConfig(train="synthetic:vowel", eval="synthetic:vowel", num_train=64, num_eval=30, max_len=32,
                      seq_len=96, batch_size=2, pack=True)
    dataset = load_split(data, kind="sft", which="eval", tokenizer=make_tokenizer("offline"))
    held = held_out_batches(dataset, data, max_batches=2)
    assert (held.examples, held.total, len(held.batches)) == (16, 30, 2)   # 4 examples a row of 96 tokens
    assert held.examples == sum(int(b["example_mask"].sum()) for b in held.batches)
    assert held_out_batches(dataset, data, max_batches=100).describe() == "30 of 30 held-out examples"
    unpacked = dataclasses.replace(data, pack=False, seq_len=None, batch_size=8)
    held = held_out_batches(dataset, unpacked, max_batches=100)  # 30 = 8 + 8 + 8 + 6 (+ 2 padding rows)
    assert (held.examples, len(held.batches), held.describe()) == (30, 4, "30 of 30 held-out examples")


def test_the_eval_line_says_how_many_held_out_examples_it_read(tmp_path, capfd):
    """20 held-out examples in batches of 8 and `train.eval_batches` 2: each evaluation reads 16 of them,
    and the console's eval line says so (it was silent), as an INFO line: no WARNING."""
    config = tiny.sft_tiny("held_out_line")
    config = dataclasses.replace(
        config, workdir=str(tmp_path / "run"),
        data=dataclasses.replace(config.data, num_train=64, num_eval=20, batch_size=8),
        train=TrainConfig(steps=1, eval_every=0, eval_batches=2), **_ONE_STEP)
    summary = sft.train(config)
    err = capfd.readouterr().err
    lines = _eval_lines(err)
    assert len(lines) == 2 and lines[0].startswith("eval @ step 0 (")   # the baseline and the final step
    shown = " ".join(f"{k}={v:.4g}" for k, v in summary["eval"].items())
    assert sorted(summary["eval"]) == ["eval/loss", "eval/mean_token_accuracy"]
    assert re.fullmatch(rf"eval @ step 1 \(\d+\.\ds, 16 of 20 held-out examples\): {re.escape(shown)}", lines[1]), \
        lines[1]
    assert "WARNING" not in err


def test_a_reward_model_eval_line_counts_real_pairs_not_padding(tmp_path, capfd):
    """12 held-out pairs in batches of 8, room for 5 batches: 12 of 12 (the 4 padding rows are not counted)."""
    config = tiny.vowel_reward_model("held_out_pairs")
    config = dataclasses.replace(
        config, workdir=str(tmp_path / "run"),
        data=dataclasses.replace(config.data, num_train=64, num_eval=12, batch_size=8),
        train=TrainConfig(steps=1, eval_every=0, eval_batches=5), **_ONE_STEP)
    reward_model.train(config)
    lines = _eval_lines(capfd.readouterr().err)
    assert [re.sub(r"\(\d+\.\ds, ", "(", line.split("):")[0]) for line in lines] == [
        "eval @ step 0 (12 of 12 held-out examples", "eval @ step 1 (12 of 12 held-out examples"]
