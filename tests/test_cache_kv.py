"""KVCache (contiguous): decoding step by step equals one full causal forward pass, for uniform and
ragged batches, every positional scheme, sinks, GQA/MQA and every backend; and every error path
leaves the cache intact.

float64 models with random O(1) weights: cache and full pass differ only in summation order, so
1e-10 is a bound with wide margin that any indexing or angle error (O(1)) breaks. The float32 case
is held to 1e-4 (float32 sums of ~100 terms of O(1), relative error ~1e-6, amplified by 2 layers).
"""

import pytest
import torch

from qkv.cache import CacheFullError, KVCache, PagedKVCache
from qkv.nn import Decoder

pytestmark = pytest.mark.usefixtures("small_tiled_backends")

TOL = dict(atol=1e-10, rtol=1e-10)

CONFIGS = {
    "rope_gqa": dict(),
    "alibi": dict(positional="alibi"),
    "learned": dict(positional="learned", max_positions=64),
    "sinusoidal_mqa": dict(positional="sinusoidal", num_kv_heads=1),
    "partial_rope_ntk": dict(head_dim=8, rotary_dim=4, rope_scaling="ntk", rope_scaling_factor=2.0),
    "linear_rope_sinks_qknorm": dict(rope_scaling="linear", rope_scaling_factor=3.0, sink=True, qk_norm=True),
}


def make_model(dtype=torch.float64, **options) -> Decoder:
    torch.manual_seed(0)
    defaults = dict(vocab_size=37, dim=16, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=24)
    model = Decoder(**{**defaults, **options})
    with torch.no_grad():  # O(1) random weights (sink logits too), so that every error shows
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return model.to(dtype).eval()


def new_cache(model, batch, capacity=48):
    return KVCache(batch_size=batch, capacity=capacity, **model.cache_spec())


def decode_ragged(model, ids, prompt_lengths, cache, backend=None):
    """Prefill each row's prompt (right-padded), then feed each row its next tokens one at a time.
    Returns logits[b][j] for every position j the cache run produced."""
    batch, total = ids.shape
    p = max(prompt_lengths)
    logits = model(ids[:, :p], cache, lengths=torch.tensor(prompt_lengths), backend=backend)
    produced = [[logits[b, j] for j in range(prompt_lengths[b])] for b in range(batch)]
    for t in range(total - p):
        step_ids = ids[torch.arange(batch), torch.tensor(prompt_lengths) + t]
        step = model(step_ids[:, None], cache, backend=backend)
        for b in range(batch):
            produced[b].append(step[b, 0])
    return produced


@pytest.mark.parametrize("config,backend", [(c, None) for c in CONFIGS] + [
    ("rope_gqa", "tiled_16x8"), ("alibi", "tiled_16x8"), ("linear_rope_sinks_qknorm", "tiled_16x8")])
def test_ragged_decode_equals_full_forward(config, backend):
    model = make_model(**CONFIGS[config])
    ids = torch.randint(0, 37, (3, 30))
    full = model(ids, backend="reference")
    cache = new_cache(model, 3)
    produced = decode_ragged(model, ids, [5, 17, 11], cache, backend=backend)
    for b, row in enumerate(produced):  # row b covers positions 0 .. prompt_b + 12
        torch.testing.assert_close(torch.stack(row), full[b, :len(row)], **TOL)
    assert cache.lengths.tolist() == [5 + 13, 17 + 13, 11 + 13]


@pytest.mark.parametrize("backend", [None, "reference", "tiled_8x16"])
def test_uniform_decode_and_chunked_prefill(backend):
    model = make_model()
    ids = torch.randint(0, 37, (2, 26))
    full = model(ids)
    cache = new_cache(model, 2)
    pieces = [model(ids[:, :7], cache, backend=backend), model(ids[:, 7:19], cache, backend=backend)]
    pieces += [model(ids[:, t:t + 1], cache, backend=backend) for t in range(19, 26)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, **TOL)


def test_ragged_chunks_in_the_middle():
    """A step whose rows add different numbers of tokens to non-empty sequences."""
    model = make_model()
    ids = torch.randint(0, 37, (2, 20))
    full = model(ids)
    cache = new_cache(model, 2)
    model(ids[:, :4], cache)
    chunk = torch.stack([ids[0, 4:10], torch.cat([ids[1, 4:7], torch.zeros(3, dtype=torch.long)])])
    out = model(chunk, cache, lengths=torch.tensor([6, 3]))
    torch.testing.assert_close(out[0], full[0, 4:10], **TOL)
    torch.testing.assert_close(out[1, :3], full[1, 4:7], **TOL)
    nxt = model(torch.stack([ids[0, 10:11], ids[1, 7:8]]), cache)
    torch.testing.assert_close(nxt[:, 0], torch.stack([full[0, 10], full[1, 7]]), **TOL)


def test_learned_positions_of_padding_may_lie_beyond_the_table():
    """Padding tokens sit at positions lengths[b] + i, past the learned table here; they are
    embedded at position 0 instead (no real token sees them). Real tokens past the table raise."""
    model = make_model(positional="learned", max_positions=8)
    ids = torch.randint(0, 37, (2, 8))
    full = model(ids)
    cache = new_cache(model, 2, capacity=8)
    padding = torch.randint(0, 37, (2, 4))
    prompt = torch.stack([ids[0, :6], torch.cat([ids[1, :2], padding[1]])])
    first = model(prompt, cache, lengths=[6, 2])
    chunk = torch.stack([torch.cat([ids[0, 6:7], padding[0, :3]]), ids[1, 2:6]])   # row 0's padding at 7, 8, 9
    second = model(chunk, cache, lengths=[1, 4])
    torch.testing.assert_close(first[0], full[0, :6], **TOL)
    torch.testing.assert_close(first[1, :2], full[1, :2], **TOL)
    torch.testing.assert_close(second[0, 0], full[0, 6], **TOL)
    torch.testing.assert_close(second[1], full[1, 2:6], **TOL)
    torch.testing.assert_close(model(ids[:, 7:8], cache, lengths=[1, 0])[0, 0], full[0, 7], **TOL)
    roomy = new_cache(model, 1, capacity=16)
    model(ids[:1], roomy)
    with pytest.raises(ValueError, match=r"input_ids .*sequence length 9 exceeds max_positions=8"):
        model(ids[:1, :1], roomy)
    assert roomy.lengths.tolist() == [8]


def test_float32_decode_matches_full_forward():
    model = make_model(dtype=torch.float32)
    ids = torch.randint(0, 37, (3, 24))
    full = model(ids)
    produced = decode_ragged(model, ids, [3, 9, 6], new_cache(model, 3))
    for b, row in enumerate(produced):
        torch.testing.assert_close(torch.stack(row), full[b, :len(row)], atol=1e-4, rtol=1e-4)


def test_cache_stores_rotated_keys_at_their_positions():
    model = make_model()
    ids = torch.randint(0, 37, (1, 6))
    cache = new_cache(model, 1, capacity=8)
    model(ids, cache)
    attn = model.blocks[0].attn
    x = model.blocks[0].attn_norm(model.token_embedding(ids))
    k = model.rope(attn._split_heads(attn.k_proj(x), attn.num_kv_heads).transpose(1, 2), 0)
    torch.testing.assert_close(cache.k[0, :, :, :6], k, **TOL)
    assert cache.lengths.tolist() == [6]


def snapshot(cache):
    return cache.k.clone(), cache.v.clone(), cache.lengths


def assert_unchanged(cache, snap):
    assert torch.equal(cache.k, snap[0]) and torch.equal(cache.v, snap[1])
    assert torch.equal(cache.lengths, snap[2])


def test_capacity_overflow_raises_and_leaves_cache_intact():
    model = make_model()
    ids = torch.randint(0, 37, (2, 12))
    full = model(ids)
    cache = new_cache(model, 2, capacity=10)
    model(ids[:, :8], cache, lengths=torch.tensor([8, 6]))
    snap = snapshot(cache)
    with pytest.raises(CacheFullError, match=r"capacity 10 exceeded: sequence\(s\) \[0\] hold \[8\] tokens"):
        model(ids[:, 8:11], cache)
    assert_unchanged(cache, snap)
    # a step that fits still works, with the right result: row 1 has room for 3 more, row 0 for 2
    out = model(torch.stack([ids[0, 8:10], ids[1, 6:8]]), cache)
    torch.testing.assert_close(out[0], full[0, 8:10], **TOL)
    torch.testing.assert_close(out[1], full[1, 6:8], **TOL)


def test_failure_inside_the_forward_pass_commits_nothing():
    model = make_model()
    ids = torch.randint(0, 37, (1, 9))
    full = model(ids)
    cache = new_cache(model, 1)
    model(ids[:, :5], cache)

    def fail(*_):
        raise RuntimeError("boom")

    handle = model.blocks[1].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        model(ids[:, 5:7], cache)
    handle.remove()
    assert cache.lengths.tolist() == [5]
    torch.testing.assert_close(model(ids[:, 5:9], cache), full[:, 5:9], **TOL)


def test_reset():
    model = make_model()
    ids = torch.randint(0, 37, (1, 6))
    cache = new_cache(model, 1)
    first = model(ids, cache)
    cache.reset()
    torch.testing.assert_close(model(ids, cache), first, **TOL)


def test_protocol_errors():
    model = make_model()
    cache = new_cache(model, 2)
    with pytest.raises(RuntimeError, match="no step in progress"):
        cache.commit()
    with pytest.raises(ValueError, match=r"layer index must be an int in \[0, 2\)"):
        cache.layer(2)
    with pytest.raises(ValueError, match="num_tokens"):
        cache.begin(0)
    with pytest.raises(ValueError, match=r"counts must have shape \(batch_size,\) = \(2,\)"):
        cache.begin(3, [1, 2, 3])
    with pytest.raises(ValueError, match=r"counts must lie in \[0, 3\]"):
        cache.begin(3, [1, 4])
    with pytest.raises(TypeError, match="counts must hold integers"):
        cache.begin(3, torch.tensor([1.0, 2.0]))
    cache.begin(2)
    k = torch.randn(2, 2, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"k must have shape \(B, Hkv, n, D\) = \(2, 2, 2, 4\)"):
        cache.layer(0).update(k[:, :1], k)
    with pytest.raises(ValueError, match="cache stores torch.float64"):
        cache.layer(0).update(k.float(), k.float())
    cache.layer(0).update(k, k)
    with pytest.raises(RuntimeError, match=r"layer\(s\) \[1\] were not updated"):
        cache.commit()
    assert cache.lengths.tolist() == [0, 0]


def test_model_and_cache_must_fit_each_other():
    model = make_model()
    ids = torch.randint(0, 37, (2, 4))
    wider = KVCache(num_layers=3, batch_size=2, capacity=8, num_kv_heads=2, head_dim=4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="cache has 3 layers"):
        model(ids, wider)
    assert wider.lengths.tolist() == [0, 0]
    with pytest.raises(ValueError, match="cache holds 3 sequences, but input_ids has batch size 2"):
        model(ids, KVCache(2, 3, 8, 2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"k must have shape \(B, Hkv, n, D\) = \(2, 1, 4, 4\)"):
        model(ids, KVCache(2, 2, 8, 1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="cache stores torch.float32"):
        model(ids, KVCache(2, 2, 8, 2, 4))
    with pytest.raises(ValueError, match="mask: with a cache"):
        model(ids, new_cache(model, 2), mask=torch.ones(4, 4, dtype=torch.bool))
    cache = new_cache(model, 2)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 4\].*got \[3, 9\]"):
        model(ids, cache, lengths=[3, 9])
    with pytest.raises(ValueError, match=r"lengths must have shape \(batch_size,\) = \(2,\)"):
        model(ids, cache, lengths=[3])
    with pytest.raises(TypeError, match="lengths must hold integers"):
        model(ids, cache, lengths=[3.0, 2.0])
    assert cache.lengths.tolist() == [0, 0]
    with pytest.raises(TypeError, match=r"cache: a PagedKVCache is a pool .*cache=pool.batch\(seq_ids\)"):
        model(ids, PagedKVCache(num_pages=4, page_size=4, **model.cache_spec()))
    with pytest.raises(TypeError, match="cache must be a qkv.cache cache"):
        model(ids, cache.layer(0))
    attn = model.blocks[0].attn
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="self-attention only"):
        attn(x, x, cache=new_cache(model, 2).layer(0))


def test_bad_constructor_arguments():
    for kwargs, match in [(dict(capacity=0), "capacity"), (dict(batch_size=-1), "batch_size"),
                          (dict(num_layers=0), "num_layers"), (dict(dtype=torch.int32), "dtype")]:
        args = dict(num_layers=1, batch_size=1, capacity=4, num_kv_heads=1, head_dim=2) | kwargs
        with pytest.raises((ValueError, TypeError), match=match):
            KVCache(**args)
