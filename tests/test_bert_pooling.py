"""Sentence pooling read from sentence-transformers files equals sentence-transformers' own Pooling
module, for every mode we support; unsupported files fail naming the file and the field."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    from sentence_transformers.sentence_transformer.modules import Pooling as STPooling
except ImportError:  # sentence-transformers < 6
    from sentence_transformers.models import Pooling as STPooling

from qkv.models import CheckpointError, Pooling, read_pooling  # noqa: E402

MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def write_st_files(directory, pooling_config, modules=MODULES, max_seq_length=None):
    (directory / "1_Pooling").mkdir(parents=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    (directory / "modules.json").write_text(json.dumps(modules))
    if max_seq_length is not None:
        (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return directory


def padded_hidden(seed=0, dim=8):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 6, dim, generator=g, dtype=torch.float64)
    mask = (torch.arange(6) < torch.tensor([6, 3, 1])[:, None]).long()
    return hidden, mask


@pytest.mark.parametrize("flags", [
    {"pooling_mode_mean_tokens": True},
    {"pooling_mode_cls_token": True},
    {"pooling_mode_max_tokens": True},
    {"pooling_mode_mean_sqrt_len_tokens": True},
    {"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": True,
     "pooling_mode_mean_sqrt_len_tokens": True},
])
def test_pooling_equals_sentence_transformers(tmp_path, flags):
    directory = write_st_files(tmp_path, {"word_embedding_dimension": 8, **flags}, modules=MODULES[:2])
    ours = read_pooling(directory)
    assert not ours.normalize
    reference = STPooling.load(str(directory / "1_Pooling"))
    hidden, mask = padded_hidden()
    want = reference({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    torch.testing.assert_close(ours(hidden, mask), want, atol=1e-12, rtol=0)


def test_normalize_and_max_length_are_read(tmp_path):
    directory = write_st_files(tmp_path, {"pooling_mode_mean_tokens": True}, max_seq_length=128)
    pooling = read_pooling(directory)
    assert pooling == Pooling(modes=("mean",), normalize=True, max_length=128)
    hidden, mask = padded_hidden(seed=1)
    out = pooling(hidden, mask)
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(out, mean / mean.norm(dim=-1, keepdim=True), atol=1e-12, rtol=0)


def test_plain_transformers_directory_mean_pools_without_normalising(tmp_path):
    assert read_pooling(tmp_path) == Pooling(modes=("mean",), normalize=False, max_length=None)


def test_unsupported_module_names_modules_json(tmp_path):
    modules = MODULES + [{"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}]
    write_st_files(tmp_path, {"pooling_mode_mean_tokens": True}, modules=modules)
    with pytest.raises(CheckpointError, match=r"modules\.json: lists module 'sentence_transformers\.models\.Dense'"):
        read_pooling(tmp_path)


@pytest.mark.parametrize("config,words", [
    ({"pooling_mode_weightedmean_tokens": True}, "field 'pooling_mode_weightedmean_tokens' is set"),
    ({"pooling_mode_mean_tokens": False}, "enables no pooling mode"),
    ({"pooling_mode": "lasttoken"}, "field 'pooling_mode' is 'lasttoken'"),
])
def test_unsupported_pooling_names_the_file_and_field(tmp_path, config, words):
    write_st_files(tmp_path, config)
    with pytest.raises(CheckpointError, match=rf"1_Pooling/config\.json: {words}"):
        read_pooling(tmp_path)


def test_missing_pooling_config_names_the_file(tmp_path):
    write_st_files(tmp_path, {})
    (tmp_path / "1_Pooling" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"1_Pooling/config\.json: pooling configuration not found"):
        read_pooling(tmp_path)
