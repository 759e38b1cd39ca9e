"""Silent wrong answers and unclear errors (issue 7, point 6): each is now a clear TypeError /
ValueError naming the argument or file, or the documented behaviour."""

import json
import shutil

import pytest
import torch

import qkv
from qkv.cache import PagedKVCache
from qkv.masks import TileGrid, evaluate_block_kinds
from qkv.models import BertModel, CheckpointError
from tests.decoders import make_model

from .fixtures.tiny_bert import edit_json, save_tiny

BACKENDS = ["reference", "tiled", "sdpa"]


def qkv_(nq=6, nk=6, heads=2):
    return torch.randn(1, heads, nq, 8), torch.randn(1, heads, nk, 8), torch.randn(1, heads, nk, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_function_must_return_bool_of_the_right_shape(backend):
    q, k, v = qkv_()
    with pytest.raises(TypeError, match=r"from_function\(as_float\): fn must return a bool tensor .* "
                                        r"got torch.float32"):
        qkv.attention(q, k, v, qkv.from_function(lambda b, h, q, k: (q - k).float(), "as_float"), backend=backend)
    with pytest.raises(TypeError, match="from_function.*got int"):
        qkv.attention(q, k, v, qkv.from_function(lambda b, h, q, k: 1), backend=backend)
    with pytest.raises(ValueError, match=r"from_function\(wide\): fn returned shape \(1, 1, 1, 7\)"):
        qkv.attention(q, k, v, qkv.from_function(lambda b, h, q, k: torch.ones(1, 1, 1, 7, dtype=torch.bool),
                                                 "wide"), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_lm_queries_at_negative_positions_see_nothing(backend):
    q, k, v = qkv_(nq=9, nk=5)  # query rows 0..3 sit at positions -4..-1
    out = qkv.attention(q, k, v, qkv.prefix_lm(2), backend=backend)
    assert out[:, :, :4].abs().max().item() == 0.0
    expected = qkv.attention(q[:, :, 4:], k, v, qkv.prefix_lm(2), backend="reference")
    torch.testing.assert_close(out[:, :, 4:], expected)


def test_prefix_lm_block_view_agrees_with_the_mask_for_nq_above_nk():
    for prefix in (0, 2, 5, 40):
        mask = qkv.prefix_lm(prefix).bind(1, 1, 45, 30, "cpu")
        grid = TileGrid(45, 30, 8, 4)
        assert torch.equal(mask.block_kinds(grid, 1, 1).expand(1, 1, -1, -1),
                           evaluate_block_kinds(mask, grid, 1, 1)), prefix


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_score_mod_returning_none_or_another_shape_is_named(backend):
    q, k, v = qkv_()
    with pytest.raises(TypeError, match="score_mod nothing: must return the modified scores as a floating tensor, "
                                        "got NoneType"):
        def nothing(score, b, h, q, k):
            return None
        qkv.attention(q, k, v, score_mod=nothing, backend=backend)
    with pytest.raises(ValueError, match=r"score_mod <lambda>: must return scores of the shape it was given"):
        qkv.attention(q, k, v, score_mod=lambda s, b, h, q, k: s.sum(-1, keepdim=True), backend=backend)


def test_global_tokens_of_nothing_huge_windows_and_deep_negation():
    q, k, v = qkv_()
    causal = qkv.attention(q, k, v, qkv.causal())
    assert qkv.attention(q, k, v, qkv.global_tokens([])).abs().max().item() == 0.0  # alone: hides everything
    torch.testing.assert_close(qkv.attention(q, k, v, qkv.causal() | qkv.global_tokens([])), causal)
    for backend in BACKENDS:
        torch.testing.assert_close(qkv.attention(q, k, v, qkv.sliding_window(10**30), backend=backend), causal)
        torch.testing.assert_close(qkv.attention(q, k, v, qkv.sliding_window(10**30, 10**30), backend=backend),
                                   qkv.attention(q, k, v))
    mask = qkv.causal()
    for _ in range(3000):
        mask = ~mask
    torch.testing.assert_close(qkv.attention(q, k, v, mask, backend="tiled"), causal)
    torch.testing.assert_close(qkv.attention(q, k, v, ~mask, backend="tiled"),
                               qkv.attention(q, k, v, ~qkv.causal(), backend="reference"))


def test_dv_zero_lse_is_covered_in_test_promises():
    q, k = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    _, lse = qkv.attention(q, k, torch.randn(1, 1, 3, 0), return_lse=True)
    assert bool(torch.isfinite(lse).all())


def test_two_open_steps_on_one_sequence_raise_and_abort_frees_it():
    model = make_model()
    pool = PagedKVCache(num_pages=16, page_size=4, **model.cache_spec())
    a, b = pool.add_sequence(), pool.add_sequence()
    model(torch.randint(0, 37, (1, 5)), pool.batch([a]))
    first, second = pool.batch([a]), pool.batch([b, a])
    first.begin(1)
    with pytest.raises(RuntimeError, match="sequence 0 has a step open in another batch"):
        second.begin(1)
    with pytest.raises(RuntimeError, match="sequence 0 has a step open"):
        model(torch.randint(0, 37, (2, 1)), second)
    assert pool.length(a) == 5 and pool.length(b) == 0
    pool.batch([b]).begin(1)  # other sequences are free
    first.abort()
    model(torch.randint(0, 37, (2, 1)), second)
    assert pool.length(a) == 6 and pool.length(b) == 1


def test_pool_owners_checks_the_page():
    pool = PagedKVCache(num_layers=1, num_pages=4, page_size=2, num_kv_heads=1, head_dim=4)
    for bad in (-1, 4, 1.0, True):
        with pytest.raises(ValueError, match=r"page must be an int in \[0, num_pages=4\)"):
            pool.owners(bad)
    assert pool.owners(3) == 0


# -- BERT checkpoints ------------------------------------------------------------------------------


@pytest.fixture
def no_model_building(monkeypatch):
    """Fail the test if the model is built: the sizes must be refused before any allocation."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("BertModel was built before the sizes were checked")

    monkeypatch.setattr(BertModel, "__init__", refuse)


@pytest.mark.parametrize("changes, match", [
    (dict(num_hidden_layers=20_000), r"config\.json: field 'num_hidden_layers' is 20000, but .* stores 2 layers"),
    (dict(vocab_size=10**9), r"embeddings\.word_embeddings\.weight': has shape \(\d+, 32\), .*vocab_size=1000000000"),
    (dict(hidden_size=2**20, num_attention_heads=1), r"hidden_size=1048576"),
    (dict(max_position_embeddings=10**8), r"position_embeddings\.weight'.*max_position_embeddings=100000000"),
    (dict(intermediate_size=10**7), r"intermediate\.dense\.weight'.*intermediate_size=10000000"),
])
def test_absurd_config_sizes_are_refused_before_allocating(tiny_copy, no_model_building, changes, match):
    edit_json(tiny_copy / "config.json", **changes)
    with pytest.raises(CheckpointError, match=match):
        BertModel.from_pretrained(tiny_copy)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/abs.safetensors", "sub/../../x.safetensors"])
def test_shard_paths_must_stay_inside_the_checkpoint(tiny_dir, tmp_path, shard):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    shutil.copy(tiny_dir / "config.json", directory)
    shutil.copy(tiny_dir / "model.safetensors", tmp_path / "outside.safetensors")
    from safetensors import safe_open

    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    index = {"weight_map": {n: shard for n in names}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: weight_map names .* outside the "
                                              r"checkpoint directory"):
        BertModel.from_pretrained(directory)
