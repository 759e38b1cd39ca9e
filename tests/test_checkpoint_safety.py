"""Training checkpoints that cannot be lost: a crash at any write, rename or removal of a save
leaves the previous complete checkpoint or the new one, and resuming from it continues bit for bit.
Loading checks dtypes and step metadata, and every error names the file."""

import json
import shutil
from contextlib import contextmanager

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qkv.models import corpus, gpt
from qkv.models.errors import CheckpointError
from qkv.models.training import TrainSettings, train

TINY = dict(dim=32, num_layers=1, num_heads=4, mlp_dim=64)
FAST = dict(batch_size=4, context=32, eval_every=100, eval_batches=1, checkpoint_every=100, warmup=2, lr=3e-3)
QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def text():
    return corpus.default_text()[:20_000]


def run(path, text, steps, **kw):
    return train(path, text, TrainSettings(steps=steps, **FAST), gpt.default_config(**TINY), **QUIET, **kw)


def weights(path):
    return gpt.load_model_from(path).state_dict()


class Crash(Exception):
    """The process dies here."""


@contextmanager
def crash_at(monkeypatch, at: int):
    """Make the ``at``-th file write, rename or directory removal of a save die half-way (a write
    leaves half its bytes; a removal leaves the directory partly removed). Yields the op counter."""
    ops = {"n": 0}
    real_write, real_replace, real_rmtree = gpt._write_durably, gpt.os.replace, gpt.shutil.rmtree

    def due():
        ops["n"] += 1
        return ops["n"] - 1 == at

    def write(path, data):
        if due():
            path.write_bytes(data[: len(data) // 2])
            raise Crash(f"write {path.name}")
        real_write(path, data)

    def replace(src, dst):
        if due():
            raise Crash(f"replace {src}")
        real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        if due():
            first = sorted(p for p in path.iterdir())[0]
            first.unlink()
            raise Crash(f"rmtree {path}")
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(gpt, "_write_durably", write)
    monkeypatch.setattr(gpt.os, "replace", replace)
    monkeypatch.setattr(gpt.shutil, "rmtree", rmtree)
    try:
        yield ops
    finally:
        monkeypatch.undo()


def test_a_crash_at_any_step_of_a_save_leaves_a_complete_checkpoint(tmp_path, text, monkeypatch):
    straight = weights(run(tmp_path / "straight", text, 3)["out_dir"])
    base = tmp_path / "base"
    run(base, text, 3, stop_after=1)  # a complete checkpoint at step 1
    probe = tmp_path / "probe"
    shutil.copytree(base, probe)
    with crash_at(monkeypatch, 10**9) as ops:
        train(probe, text, resume=True, stop_after=1, **QUIET)
    total = ops["n"]
    assert total >= 6  # 3 files, the pointer, its rename, the old step directory's removal
    seen = set()
    for at in range(total):
        d = tmp_path / f"crash{at}"
        shutil.copytree(base, d)
        with crash_at(monkeypatch, at), pytest.raises(Crash):
            train(d, text, resume=True, stop_after=1, **QUIET)  # dies saving step 2
        meta = gpt.read_meta(d)
        seen.add(meta["step"])
        assert meta["step"] in (1, 2), at
        resumed = train(d, text, resume=True, **QUIET)  # whichever it is, it is whole
        assert resumed["step"] == 3
        after = weights(d)
        assert all(torch.equal(after[n], straight[n]) for n in straight), f"crash at op {at}: weights differ"
    assert seen == {1, 2}  # crashes before the switch keep step 1, after it step 2


def test_the_pointer_names_the_checkpoint_and_old_steps_go(tmp_path, text):
    run(tmp_path, text, 4, stop_after=2)
    run_dir = gpt.checkpoint_dir(tmp_path)
    assert run_dir.name == "step-00000002" and (tmp_path / gpt.POINTER).read_text().strip() == run_dir.name
    train(tmp_path, text, resume=True, **QUIET)
    assert gpt.checkpoint_dir(tmp_path).name == "step-00000004"
    assert sorted(p.name for p in tmp_path.iterdir()) == [gpt.POINTER, "step-00000004"]
    (tmp_path / gpt.POINTER).write_text("../elsewhere\n")
    with pytest.raises(CheckpointError, match="LATEST: must name a step directory"):
        gpt.read_meta(tmp_path)


def _rewrite(path, change=None, metadata="keep"):
    """Rewrite a safetensors file with ``change(name, tensor)`` applied and/or other metadata."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
        meta = f.metadata()
    if change is not None:
        tensors = {n: change(n, t) for n, t in tensors.items()}
    save_file(tensors, str(path), metadata=meta if metadata == "keep" else metadata)


def test_weights_of_another_dtype_or_without_step_metadata_are_refused(tmp_path, text):
    run(tmp_path, text, 2)
    step_dir = gpt.checkpoint_dir(tmp_path)
    weights_file = step_dir / "model.safetensors"
    intact = weights_file.read_bytes()
    victim = sorted(weights(tmp_path))[0]
    _rewrite(weights_file, lambda n, t: (t * 100).to(torch.int32) if n == victim else t)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{victim}': is I32, expected float32"):
        gpt.load_model_from(tmp_path)
    weights_file.write_bytes(intact)
    _rewrite(weights_file, metadata=None)
    with pytest.raises(CheckpointError, match="model.safetensors: has no step in its metadata"):
        gpt.load_model_from(tmp_path)
    weights_file.write_bytes(intact)
    _rewrite(step_dir / "trainer.safetensors", metadata=None)
    with pytest.raises(CheckpointError, match="trainer.safetensors: has no step in its metadata"):
        train(tmp_path, text, TrainSettings(steps=3, **FAST), resume=True, **QUIET)


def test_config_and_trainer_state_errors_name_the_file(tmp_path, text):
    run(tmp_path, text, 2)
    step_dir = gpt.checkpoint_dir(tmp_path)
    config = step_dir / "config.json"
    intact = config.read_text()
    config.write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: is not valid JSON"):
        gpt.load_model_from(tmp_path)
    for field in ("step", "model", "train"):
        meta = json.loads(intact)
        del meta[field]
        config.write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match=f"config.json: field '{field}' is missing"):
            train(tmp_path, text, resume=True, **QUIET)
    meta = json.loads(intact)
    meta["model"]["nonsense"] = 1
    config.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="config.json: field 'model' is not a valid model configuration"):
        gpt.load_model_from(tmp_path)
    config.write_text(intact)
    trainer = step_dir / "trainer.safetensors"
    with safe_open(str(trainer), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
        stamp = f.metadata()
    tensors["garbage"] = torch.zeros(2)
    save_file(tensors, str(trainer), metadata=stamp)
    with pytest.raises(CheckpointError, match="trainer.safetensors: tensor 'garbage': is not an optimizer moment"):
        train(tmp_path, text, TrainSettings(steps=3, **FAST), resume=True, **QUIET)
