"""Loading BERT-family checkpoints: every file layout we accept equals ``transformers`` on the
same directory, and every bad checkpoint fails naming the file and the tensor (or field).

All checkpoints here are tiny random models written by ``transformers`` into temporary folders.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qkv.models import BertModel, CheckpointError
from qkv.models.bert_weights import hf_name

from .fixtures.tiny_bert import TINY, edit_json, reference, save_tiny

os.environ["HF_HUB_OFFLINE"] = "1"



def random_batch(vocab_size, pad_id=0, lengths=(11, 7, 3), seed=1):
    """Random ids (specials excluded) with right padding, and random token types."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(pad_id + 2, vocab_size, (len(lengths), n), generator=g)
    mask = (torch.arange(n) < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad_id)
    types = torch.randint(0, 2, ids.shape, generator=g) * mask
    return ids, mask, types


def assert_matches_transformers(directory, dtype, atol, *, types=True):
    ours = BertModel.from_pretrained(directory, dtype=dtype)
    ref = reference(directory).to(dtype)
    config = json.loads((directory / "config.json").read_text())
    ids, mask, token_types = random_batch(config["vocab_size"], config.get("pad_token_id") or 0)
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=token_types if types else None)
    with torch.no_grad():
        got = ours(**inputs, output_attentions=True, output_hidden_states=True)
        want = ref(**inputs, output_attentions=True, output_hidden_states=True)
    real = mask.bool()
    assert len(got.attentions) == len(want.attentions) == config["num_hidden_layers"]
    for g, w in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(g[real], w[real], atol=atol, rtol=0)
    for g, w in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(g.to(dtype), w, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_tiny_bert_equals_transformers(tiny_dir, dtype, atol):
    assert_matches_transformers(tiny_dir, dtype, atol)


@pytest.mark.parametrize("backend", [None, "tiled"])
def test_gradients_equal_transformers(tiny_dir, backend):
    """float64, padded batch: the gradient of a random loss reaches every parameter as in transformers."""
    ours = BertModel.from_pretrained(tiny_dir, dtype=torch.float64, backend=backend)
    ref = reference(tiny_dir).double()
    ids, mask, types = random_batch(TINY["vocab_size"])
    weights = torch.randn(*ids.shape, TINY["hidden_size"], dtype=torch.float64) * mask[..., None]
    (ours(ids, mask, types).last_hidden_state * weights).sum().backward()
    (ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state * weights).sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[hf_name(name)].grad, atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_prefixed_checkpoint_with_task_head_loads(tmp_path, model_type):
    """A masked-LM checkpoint stores the encoder as ``bert.*``/``roberta.*`` next to its head."""
    directory = save_tiny(tmp_path / model_type, model_type=model_type, with_head=True, seed=3)
    assert_matches_transformers(directory, torch.float64, 1e-12, types=model_type == "bert")


def test_roberta_positions_count_after_padding(tmp_path):
    directory = save_tiny(tmp_path / "roberta", model_type="roberta", seed=4)
    assert_matches_transformers(directory, torch.float64, 1e-12, types=False)
    model = BertModel.from_pretrained(directory)
    assert model.config.max_tokens == TINY["max_position_embeddings"]  # 2 of the 66 positions are reserved


def test_pytorch_bin_with_old_layer_norm_names_loads(tiny_dir, tmp_path):
    """``pytorch_model.bin`` (read with weights_only=True), ``bert.`` prefix, LayerNorm ``gamma``/``beta``."""
    state = load_file(tiny_dir / "model.safetensors")
    old_names = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}
    renamed = {}
    for name, t in state.items():
        for new, old in old_names.items():
            name = name.replace(new, old)
        renamed["bert." + name] = t
    renamed["bert.embeddings.position_ids"] = torch.arange(TINY["max_position_embeddings"])[None]
    directory = tmp_path / "bin"
    directory.mkdir()
    shutil.copy(tiny_dir / "config.json", directory)
    torch.save(renamed, directory / "pytorch_model.bin")
    got = BertModel.from_pretrained(directory, dtype=torch.float64)
    want = BertModel.from_pretrained(tiny_dir, dtype=torch.float64)
    for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def write_shards(source_dir, directory, *, drop_shard=False):
    """Split ``source_dir``'s weights over two safetensors shards with an index."""
    state = load_file(source_dir / "model.safetensors")
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    directory.mkdir()
    shutil.copy(source_dir / "config.json", directory)
    for file, part in halves.items():
        if not (drop_shard and file.startswith("model-00002")):
            save_file({n: state[n] for n in part}, directory / file)
    weight_map = {n: file for file, part in halves.items() for n in part}
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return halves


def test_sharded_safetensors_loads(tiny_dir, tmp_path):
    write_shards(tiny_dir, tmp_path / "sharded")
    assert_matches_transformers(tmp_path / "sharded", torch.float64, 1e-12)


# --- bad checkpoints: each error names the file, and the tensor or field -------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*checkpoint directory not found"):
        BertModel.from_pretrained(tmp_path / "nowhere")


def test_missing_config(tiny_copy):
    (tiny_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"copy/config\.json"):
        BertModel.from_pretrained(tiny_copy)


def test_missing_weights_file(tiny_copy):
    (tiny_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"copy: no weights found; expected one of model\.safetensors"):
        BertModel.from_pretrained(tiny_copy)


def test_missing_shard(tiny_dir, tmp_path):
    halves = write_shards(tiny_dir, tmp_path / "sharded", drop_shard=True)
    first_missing = halves["model-00002-of-00002.safetensors"][0]
    with pytest.raises(FileNotFoundError,
                       match=rf"model-00002-of-00002\.safetensors: shard not found.*{first_missing}"):
        BertModel.from_pretrained(tmp_path / "sharded")


@pytest.mark.parametrize("changes,field,words", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "model_type", "BERT-family"),
    (dict(model_type=None), "model_type", "BERT-family"),
    (dict(hidden_size=30), "num_attention_heads", "must divide hidden_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers", "integer >= 1"),
    (dict(intermediate_size=None), "intermediate_size", "is missing"),
    (dict(hidden_act="swish"), "hidden_act", "supported"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type", "only 'absolute'"),
    (dict(is_decoder=True), "is_decoder", "encoders only"),
    (dict(layer_norm_eps=-1.0), "layer_norm_eps", "positive"),
])
def test_wrong_architecture_names_config_field(tiny_copy, changes, field, words):
    edit_json(tiny_copy / "config.json", **changes)
    with pytest.raises(CheckpointError, match=rf"config\.json: field '{field}' .*{words}") as info:
        BertModel.from_pretrained(tiny_copy)
    assert info.value.file == str(tiny_copy / "config.json")


def test_config_that_is_not_json(tiny_copy):
    (tiny_copy / "config.json").write_text("{'model_type': 'bert'")
    with pytest.raises(CheckpointError, match=r"config\.json: is not valid JSON"):
        BertModel.from_pretrained(tiny_copy)


def rewrite_weights(directory, edit):
    state = load_file(directory / "model.safetensors")
    edit(state)
    save_file(state, directory / "model.safetensors")


def test_shape_mismatch_names_file_and_tensor(tiny_copy):
    name = "encoder.layer.1.attention.self.key.weight"
    rewrite_weights(tiny_copy, lambda s: s.update({name: torch.randn(32, 16)}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}': has shape \(32, 16\), "
                                              rf"but the model described by config\.json needs \(32, 32\)") as info:
        BertModel.from_pretrained(tiny_copy)
    assert (info.value.file, info.value.tensor) == (str(tiny_copy / "model.safetensors"), name)


def test_config_disagreeing_with_weights_is_a_shape_mismatch(tiny_copy):
    edit_json(tiny_copy / "config.json", intermediate_size=40)
    with pytest.raises(CheckpointError, match=r"tensor 'encoder\.layer\.0\.intermediate\.dense\.weight': "
                                              r"has shape \(37, 32\).*needs \(40, 32\)"):
        BertModel.from_pretrained(tiny_copy)


def test_missing_tensor_names_file_and_tensor(tiny_copy):
    name = "encoder.layer.1.output.LayerNorm.bias"
    rewrite_weights(tiny_copy, lambda s: s.pop(name))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}': is missing") as info:
        BertModel.from_pretrained(tiny_copy)
    assert info.value.tensor == name


def test_extra_layer_names_the_unexpected_tensor(tiny_copy):
    edit_json(tiny_copy / "config.json", num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'encoder\.layer\.1\..*': is not part of "
                                              r"the model described by config\.json"):
        BertModel.from_pretrained(tiny_copy)


def test_integer_weight_is_rejected(tiny_copy):
    name = "embeddings.token_type_embeddings.weight"
    rewrite_weights(tiny_copy, lambda s: s.update({name: torch.ones(2, 32, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}': has dtype torch\.int32"):
        BertModel.from_pretrained(tiny_copy)


def test_not_a_bert_checkpoint_names_the_anchor_tensor(tiny_copy):
    rewrite_weights(tiny_copy, lambda s: s.update({"wte.weight": s.pop("embeddings.word_embeddings.weight")}))
    with pytest.raises(CheckpointError,
                       match=r"tensor 'embeddings\.word_embeddings\.weight': is missing .*BERT-family"):
        BertModel.from_pretrained(tiny_copy)


def safetensors_layout(path):
    """(header length, {name: (start, end)}) of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return n, {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}


@pytest.mark.parametrize("keep_fraction", [0.5, 0.999])
def test_truncated_safetensors_names_the_first_cut_tensor(tiny_copy, keep_fraction):
    path = tiny_copy / "model.safetensors"
    header_len, spans = safetensors_layout(path)
    data_len = path.stat().st_size - 8 - header_len
    kept = int(data_len * keep_fraction)
    path.write_bytes(path.read_bytes()[: 8 + header_len + kept])
    first_cut = min((span for span in spans.items() if span[1][1] > kept), key=lambda item: item[1][0])[0]
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{first_cut}': is cut off: the file is "
                                              rf"truncated") as info:
        BertModel.from_pretrained(tiny_copy)
    assert info.value.tensor == first_cut


@pytest.mark.parametrize("size,words", [(5, "shorter than the 8-byte header length"), (100, "header claims")])
def test_truncated_safetensors_header(tiny_copy, size, words):
    path = tiny_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:size])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: is truncated.*{words}"):
        BertModel.from_pretrained(tiny_copy)


def test_truncated_pytorch_bin(tiny_dir, tmp_path):
    directory = tmp_path / "bin"
    directory.mkdir()
    shutil.copy(tiny_dir / "config.json", directory)
    torch.save(load_file(tiny_dir / "model.safetensors"), directory / "pytorch_model.bin")
    raw = (directory / "pytorch_model.bin").read_bytes()
    (directory / "pytorch_model.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError,
                       match=r"pytorch_model\.bin: cannot be read by torch\.load\(weights_only=True\)"):
        BertModel.from_pretrained(directory)
