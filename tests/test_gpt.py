"""The small causal LM: teacher-forced training lowers the loss, runs are deterministic, resuming
from a checkpoint continues bit for bit, and decoding from the KV cache equals recomputing."""

import json
import math

import pytest
import torch

from qkv.cli import main as cli
from qkv.models import corpus, gpt
from qkv.models.training import TrainSettings, train

TINY = dict(dim=32, num_layers=2, num_heads=4, mlp_dim=64)
FAST = dict(batch_size=8, context=32, eval_every=5, eval_batches=2, checkpoint_every=100, warmup=3, lr=3e-3)


@pytest.fixture(scope="module")
def text():
    return corpus.default_text()[:60_000]


def run(path, text, steps, **kw):
    return train(path, text, TrainSettings(steps=steps, **FAST), gpt.default_config(**TINY), progress=False,
                 log=lambda *_: None, **kw)


def weights(path):
    return gpt.load_model_from(path).state_dict()


def test_training_lowers_the_loss_below_the_unigram_baseline(tmp_path, text):
    summary = run(tmp_path, text, 200)
    losses = [h["val_loss"] for h in summary["history"]]
    assert losses[0] > losses[-1]
    assert losses[0] < math.log(256) + 0.5  # starts near uniform over bytes
    assert losses[-1] < summary["unigram_loss"], (losses, summary["unigram_loss"])


def test_same_seed_same_model_and_other_seed_differs(tmp_path, text):
    run(tmp_path / "a", text, 4)
    run(tmp_path / "b", text, 4)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)
    train(tmp_path / "c", text, TrainSettings(steps=4, seed=1, **FAST), gpt.default_config(**TINY), progress=False,
          log=lambda *_: None)
    c = weights(tmp_path / "c")
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_resume_continues_bit_exact(tmp_path, text):
    straight = run(tmp_path / "straight", text, 10)
    first = run(tmp_path / "split", text, 10, stop_after=4)
    assert first["step"] == 4
    resumed = train(tmp_path / "split", text, resume=True, progress=False, log=lambda *_: None)
    assert resumed["step"] == 10
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert all(torch.equal(a[n], b[n]) for n in a)
    losses = lambda summary: [(h["step"], h["train_loss"], h["val_loss"]) for h in summary["history"]]  # noqa: E731
    assert losses(straight) == losses(resumed)


def test_resume_restores_the_dropout_random_state(tmp_path, text):
    config = gpt.default_config(**TINY, dropout=0.1)
    straight = train(tmp_path / "a", text, TrainSettings(steps=8, **FAST), config, progress=False, log=lambda *_: None)
    train(tmp_path / "b", text, TrainSettings(steps=8, **FAST), config, stop_after=3, progress=False,
          log=lambda *_: None)
    torch.manual_seed(12345)  # whatever happens in between must not matter
    resumed = train(tmp_path / "b", text, resume=True, progress=False, log=lambda *_: None)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert straight["history"][-1]["val_loss"] == resumed["history"][-1]["val_loss"]


def test_resume_refuses_other_settings_text_or_model(tmp_path, text):
    run(tmp_path, text, 6, stop_after=2)
    quiet = dict(progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match=r"cannot resume: lr \(0.003 in the checkpoint, 0.01 now\)"):
        train(tmp_path, text, TrainSettings(steps=6, **dict(FAST, lr=1e-2)), resume=True, **quiet)
    with pytest.raises(ValueError, match="model dim"):
        train(tmp_path, text, model_config=gpt.default_config(**dict(TINY, dim=64)), resume=True, **quiet)
    with pytest.raises(ValueError, match="training text"):
        train(tmp_path, text + "!", resume=True, **quiet)
    # More steps are allowed: the run continues to the new total.
    longer = train(tmp_path, text, TrainSettings(steps=9, **FAST), resume=True, **quiet)
    assert longer["step"] == 9


def test_an_interrupted_save_is_detected(tmp_path, text):
    run(tmp_path / "early", text, 4, stop_after=2)
    run(tmp_path / "late", text, 4)
    late, early = gpt.checkpoint_dir(tmp_path / "late"), gpt.checkpoint_dir(tmp_path / "early")
    (late / "trainer.safetensors").write_bytes((early / "trainer.safetensors").read_bytes())
    with pytest.raises(ValueError, match="is from step 2 but config.json says step 4: a save was interrupted"):
        train(tmp_path / "late", text, resume=True, progress=False, log=lambda *_: None)


def test_a_text_too_short_for_the_context_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="validation part has 50 bytes, not more than the context of 128"):
        train(tmp_path, "x" * 1000, TrainSettings(steps=2), gpt.default_config(**TINY), progress=False,
              log=lambda *_: None)


def test_greedy_generation_with_cache_equals_recomputing(tmp_path, text):
    run(tmp_path, text, 20)
    model = gpt.load_model_from(tmp_path)
    prompt = corpus.encode("The class ")[None]
    cached = model.generate(prompt, 40, temperature=0)
    plain = gpt.generate_without_cache(model, prompt, 40, temperature=0)
    assert cached.shape == (1, 40)
    assert torch.equal(cached, plain)


def test_unigram_baseline_is_the_cross_entropy_of_byte_frequencies():
    c = corpus.Corpus("ab" * 48 + "aaab", val_fraction=0.04)  # train: 48 a, 48 b; validation: "aaab"
    assert corpus.decode(c.val.tolist()) == "aaab"
    p_a = p_b = (48 + 1) / (96 + 256)  # add-one smoothing over 256 byte values
    expected = -(3 * math.log(p_a) + math.log(p_b)) / 4
    assert abs(c.unigram_loss() - expected) < 1e-12


def test_bytes_round_trip():
    text = "naïve café — λ"
    assert corpus.decode(corpus.encode(text).tolist()) == text
    assert corpus.encode(text).max() < 256


def test_checkpoint_errors(tmp_path, text):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        gpt.load_model_from(tmp_path)
    run(tmp_path, text, 2)
    step_dir = gpt.checkpoint_dir(tmp_path)
    weights_file = step_dir / "model.safetensors"
    intact = weights_file.read_bytes()
    weights_file.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(ValueError, match="model.safetensors: is damaged"):
        gpt.load_model_from(tmp_path)
    weights_file.write_bytes(intact)
    meta = json.loads((step_dir / "config.json").read_text())
    meta["model"]["dim"] = 64
    (step_dir / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not fit the model"):
        gpt.load_model_from(tmp_path)
    (step_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        gpt.load_model_from(tmp_path)


def test_bad_settings_and_text(tmp_path):
    with pytest.raises(ValueError, match="steps must be a positive int"):
        TrainSettings(steps=0)
    with pytest.raises(ValueError, match="min_lr_ratio must be in \\[0, 1\\]"):
        TrainSettings(min_lr_ratio=2.0)
    with pytest.raises(ValueError, match="warmup must be an int >= 0"):
        TrainSettings(warmup=-1)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got inf"):
        TrainSettings(lr=math.inf)  # trained every weight into NaN
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0, got inf"):
        TrainSettings(weight_decay=math.inf)
    with pytest.raises(FileNotFoundError, match="no such file"):
        corpus.read_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="fewer than context"):
        corpus.Corpus("x" * 100).batch("val", 2, 32, torch.Generator())


def test_cli_train_then_generate(tmp_path, capsys):
    text_file = tmp_path / "t.txt"
    text_file.write_text(corpus.default_text()[:20_000])
    out = tmp_path / "run"
    assert cli(["train", "--text", str(text_file), "--out", str(out), "--steps", "3", "--batch-size", "4",
                "--context", "32", "--eval-every", "3", "--dim", "32", "--layers", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "validation loss" in printed and "the unigram baseline of" in printed and "better" not in printed
    assert cli(["generate", "--checkpoint", str(out), "--prompt", "def ", "--max-new-tokens", "8",
                "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("def ") and "tokens/s" in printed and "same tokens" in printed
    # --resume keeps the checkpoint's settings; only --steps may grow.
    assert cli(["train", "--text", str(text_file), "--out", str(out), "--resume", "--steps", "4", "--no-progress"]) == 0
    assert "done: step 4" in capsys.readouterr().out
    assert cli(["train", "--text", str(text_file), "--out", str(out), "--resume", "--batch-size", "8"]) == 2
    assert "qkv train: error: cannot resume: batch_size" in capsys.readouterr().err
    # A finished run is not overwritten by accident: --overwrite replaces it.
    fresh = ["train", "--text", str(text_file), "--out", str(out), "--steps", "2", "--batch-size", "4", "--context",
             "32", "--eval-every", "2", "--dim", "32", "--layers", "1", "--no-progress"]
    assert cli(fresh) == 2
    assert "already holds files; pass --resume to continue its run or --overwrite" in capsys.readouterr().err
    assert cli([*fresh, "--overwrite"]) == 0
    assert "done: step 2" in capsys.readouterr().out


def test_cli_train_stopped_early_says_so(tmp_path, capsys):
    """--stop-after ends a run before --steps: the CLI says it stopped (not "done"), and which step
    its last validation loss is from."""
    text_file = tmp_path / "t.txt"
    text_file.write_text(corpus.default_text()[:20_000])
    out = tmp_path / "run"
    assert cli(["train", "--text", str(text_file), "--out", str(out), "--steps", "4", "--stop-after", "3",
                "--batch-size", "2", "--context", "16", "--eval-every", "2", "--dim", "16", "--layers", "1",
                "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "done" not in printed and "next: qkv generate" not in printed, printed
    assert "stopped at step 3 of 4 (last validation loss" in printed and "at step 2)" in printed, printed
    assert "continue with --resume" in printed
