"""The decoding hot path (issue 14): the fast path of qkv.attention computes exactly what the
dispatcher's choice computes and only where the dispatcher chooses SDPA; RoPE from the cached table
is bit-identical to computing the angles; uniform cache steps build no index tensors and equal the
full pass; no dropout modules at p = 0; the fixed-shape decode step compiles with fullgraph=True and
decodes the same tokens."""

import math

import pytest
import torch

import qkv
from qkv import fastpath
from qkv.backends import REGISTRY
from qkv.cache import KVCache, PagedKVCache, StreamingKVCache, set_debug
from qkv.nn import Decoder, RotaryEmbedding
from qkv.nn.compiled import DecodeStep, StaticCacheLayer
from qkv.nn.fused import fused_projections
from qkv.problem import make_problem
from tests.decoders import TOL, make_model

NAN, INF = float("nan"), float("inf")


def general_sdpa(q, k, v, mask=None):
    """What the general path runs on the SDPA backend (no fast path involved)."""
    return REGISTRY["sdpa"].run(make_problem(q, k, v, mask))[0]


def decode_inputs(batch, hq, hkv, nk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, hq, 1, d, generator=g).to(dtype), torch.randn(batch, hkv, nk, d, generator=g).to(dtype),
            torch.randn(batch, hkv, nk, d, generator=g).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_fast_path_equals_the_general_path_bit_for_bit(dtype, heads):
    q, k, v = decode_inputs(2, *heads, 77, 16, dtype)
    key_mask = (torch.arange(77) <= torch.tensor([30, 76])[:, None])[:, None, None, :]
    k[0, :, 31:] = NAN  # hidden by the key mask: must not matter
    for mask in (None, qkv.causal(), key_mask):
        kk = k if mask is key_mask else k.nan_to_num()
        fast = qkv.attention(q, kk, v, mask, backend="sdpa")
        assert torch.equal(fast, general_sdpa(q, kk, v, mask)), (dtype, heads, mask)
    sq = torch.randn(2, heads[0], 77, 16).to(dtype)  # square causal: SDPA's is_causal
    assert torch.equal(qkv.attention(sq, k.nan_to_num(), v, qkv.causal(), backend="sdpa"),
                       general_sdpa(sq, k.nan_to_num(), v, qkv.causal()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_fast_path_keeps_the_nan_promise(dtype, causal):
    """A query holding NaN or inf gives a NaN row, as on every backend (torch's kernels alone may
    return zeros for some dtypes and masks)."""
    for nq in (1, 24):
        q, k, v = (torch.randn(2, 2, n, 32).to(dtype) for n in (nq, 24, 24))
        q[0, 1, -1, 3], q[1, 0, 0, 0] = NAN, INF
        out = qkv.attention(q, k, v, qkv.causal() if causal else None, backend="sdpa")
        assert bool(out[0, 1, -1].isnan().all()) and bool(out[1, 0, 0].isnan().all())
        assert int(out.isnan().any(-1).sum()) == 2


def test_fast_path_follows_the_dispatcher(monkeypatch):
    """Across decode shapes, a call takes the fast path only where explain_dispatch says sdpa, and
    then the decision is the one remembered for its signature."""
    fastpath.clear()
    served = 0
    for nk in (1, 2, 3, 7, 16, 31, 64, 100, 255, 256, 600, 1500):
        for mask in (None, qkv.causal()):
            q, k, v = decode_inputs(1, 4, 4, nk, 32, torch.float32, seed=nk)
            out = fastpath.attend(q, k, v, mask, None)
            chosen = qkv.explain_dispatch(q, k, v, mask).chosen
            if out is not None:
                served += 1
                assert chosen == "sdpa", nk
                assert torch.equal(out, qkv.attention(q, k, v, mask))
    assert served >= 8
    # a signature the dispatcher sends elsewhere is not served
    monkeypatch.setattr(REGISTRY["reference"], "estimate", lambda problem: 0.0)
    fastpath.clear()
    q, k, v = decode_inputs(1, 4, 4, 40, 32, torch.float32)
    assert fastpath.attend(q, k, v, None, None) is None
    assert qkv.explain_dispatch(q, k, v).chosen == "reference"
    assert fastpath.attend(q, k, v, None, None, "sdpa") is not None  # forced: SDPA can run it
    monkeypatch.undo()
    fastpath.clear()


def test_fast_path_serves_a_signature_only_where_sdpa_wins_with_and_without_gradients(monkeypatch):
    """The key holds no grad mode, so a signature is served only if the dispatcher picks SDPA in
    both: here it picks the reference backend as soon as gradients are needed."""
    fastpath.clear()
    monkeypatch.setattr(REGISTRY["reference"], "estimate", lambda problem: 0.0 if problem.requires_grad else math.inf)
    q, k, v = decode_inputs(1, 4, 4, 40, 32, torch.float32)
    with torch.no_grad():
        assert qkv.explain_dispatch(q, k, v).chosen == "sdpa"
        assert fastpath.attend(q, k, v, None, None) is None
    assert qkv.explain_dispatch(q.requires_grad_(), k, v).chosen == "reference"
    assert fastpath.attend(q, k, v, None, None) is None
    monkeypatch.undo()
    fastpath.clear()


def test_a_remembered_signature_still_rejects_mixed_dtypes_devices_and_non_tensors():
    """The key holds q's dtype and device only: a later call that mixes them is told what is
    wrong by the general path, and an unusual first call is not remembered for the rest."""
    fastpath.clear()
    q, k, v = decode_inputs(1, 4, 4, 8, 16, torch.float32)
    with pytest.raises(TypeError, match="share one dtype"):  # first seen in error: not remembered
        qkv.attention(q, k.double(), v)
    assert fastpath.attend(q, k, v, None, None) is not None  # remembered now
    with pytest.raises(TypeError, match="share one dtype"):
        qkv.attention(q, k, v.double())
    with pytest.raises(ValueError, match="one device"):
        qkv.attention(q, k.to("meta"), v)
    with pytest.raises(TypeError):
        qkv.attention(q, k.tolist(), v)
    fastpath.clear()


def test_fast_path_leaves_bad_arguments_to_the_general_path():
    q, k, v = decode_inputs(1, 4, 4, 8, 16, torch.float32)
    with pytest.raises(TypeError, match="share one dtype"):
        qkv.attention(q, k.double(), v)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        qkv.attention(q, k, v, scale=math.inf)
    with pytest.raises(ValueError, match="same sequence length"):
        qkv.attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="dropout_p"):
        qkv.attention(q, k, v, dropout_p=False)
    assert torch.equal(qkv.attention(q, k, v, scale=2), qkv.attention(q, k, v, scale=2.0))


def old_rope(rope: RotaryEmbedding, x, positions):
    """The rotation as computed before the table: float64 angles per call, cast, a*cos - b*sin."""
    theta = rope.angles(positions if positions.dim() == 2 else positions[None]).unsqueeze(1)
    cos, sin = theta.cos().to(x.dtype), theta.sin().to(x.dtype)
    rot, rest = x[..., :rope.rotary_dim], x[..., rope.rotary_dim:]
    if rope.interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    else:
        a, b = rot.chunk(2, dim=-1)
        rotated = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return torch.cat((rotated, rest), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved,rotary_dim", [(False, None), (True, None), (False, 4)])
def test_rope_table_is_bit_identical_to_computed_angles(dtype, interleaved, rotary_dim):
    rope = RotaryEmbedding(8, rotary_dim=rotary_dim, interleaved=interleaved, scaling="linear", scaling_factor=2.0)
    x = torch.randn(2, 3, 5, 8).to(dtype)
    for positions in (torch.arange(5), torch.arange(300, 305), torch.tensor([[0, 4, 9, 1, 2], [7, 7, 8, 100, 3]]),
                      torch.arange(70_000, 70_005)):  # the last beyond the table: angles computed
        assert torch.equal(rope(x, positions), old_rope(rope, x, positions)), positions
    assert torch.equal(rope(x, 300), old_rope(rope, x, torch.arange(300, 305)))
    assert rope._table[0].dtype == dtype and rope._table[0].shape[0] >= 305  # grown on demand, model dtype


def test_one_rotation_per_step_and_a_uniform_step_builds_no_positions():
    model = make_model()
    calls = []
    original = model.rope.rotation
    model.rope.rotation = lambda *a, **kw: calls.append(a) or original(*a, **kw)
    cache = KVCache(batch_size=2, capacity=16, **model.cache_spec())
    ids = torch.randint(0, 37, (2, 9))
    with torch.no_grad():
        model(ids[:, :8], cache)
        calls.clear()
        step = model(ids[:, 8:], cache)
    assert len(calls) == 1 and calls[0][0] == 8  # once per step, for every layer, from the int offset
    torch.testing.assert_close(step, model(ids)[:, 8:], **TOL)
    assert cache.lengths.tolist() == [9, 9] and cache._uniform == 9


@pytest.mark.parametrize("kind", ["contiguous", "paged", "streaming"])
def test_uniform_hot_path_equals_the_full_pass_in_debug_mode(kind):
    """Debug mode checks every layer and the hot path's bookkeeping against the general one's."""
    model = make_model()
    ids = torch.randint(0, 37, (2, 14))
    spec = model.cache_spec()
    if kind == "contiguous":
        cache = KVCache(batch_size=2, capacity=14, **spec)
    elif kind == "paged":
        pool = PagedKVCache(num_pages=12, page_size=4, **spec)
        cache = pool.batch([pool.add_sequence(), pool.add_sequence()])
    else:
        cache = StreamingKVCache(batch_size=2, sinks=2, window=20, **spec)
    set_debug(True)
    try:
        with torch.no_grad():
            pieces = [model(ids[:, :5], cache)] + [model(ids[:, t:t + 1], cache) for t in range(5, 14)]
    finally:
        set_debug(False)
    torch.testing.assert_close(torch.cat(pieces, 1), model(ids), **TOL)
    assert cache.lengths.tolist() == [14, 14]


def test_no_dropout_modules_at_p_zero():
    assert not any(isinstance(m, torch.nn.Dropout) for m in Decoder(vocab_size=11, dim=8, num_layers=2,
                                                                     num_heads=2).modules())
    with_dropout = Decoder(vocab_size=11, dim=8, num_layers=2, num_heads=2, dropout=0.1)
    assert sum(isinstance(m, torch.nn.Dropout) for m in with_dropout.modules()) == 1 + 2 * 2


def test_decode_step_compiles_whole_and_decodes_the_same_tokens():
    """One compile (dynamo with fullgraph=True: any graph break raises; the eager backend keeps it
    quick), then ragged prompts: the tokens of eager decoding, and a cache that continues."""
    from tests.test_generate import make_model as confident_model

    model = confident_model()
    prompts = torch.randint(0, 23, (3, 6))
    lengths = torch.tensor([3, 6, 4])
    expected = model.generate(prompts, 10, temperature=0, lengths=lengths)
    torch._dynamo.reset()
    out = model.generate(prompts, 10, temperature=0, lengths=lengths, compile={"backend": "eager"})
    assert torch.equal(out, expected)
    cache = model._compiled_decode_cache
    assert cache.lengths.tolist() == [3 + 9, 6 + 9, 4 + 9]
    # the cache holds what eager decoding would have put there
    eager = KVCache(batch_size=3, capacity=cache.capacity, **model.cache_spec())
    with torch.no_grad():
        model(prompts, eager, lengths=lengths)
        for t in range(9):
            model(out[:, t:t + 1], eager)
    for b, n in enumerate(cache.lengths.tolist()):
        torch.testing.assert_close(cache.k[:, b, :, :n], eager.k[:, b, :, :n], **TOL)
        torch.testing.assert_close(cache.v[:, b, :, :n], eager.v[:, b, :, :n], **TOL)


def test_compiled_cpu_step_reads_the_filled_slots_with_one_graph():
    """On the CPU the step's length is a dynamic size: one graph for every length of a uniform
    batch, one more for a ragged one (masked); a cache of exactly the needed capacity works too (its
    last step reads the whole buffer and runs uncompiled)."""
    from torch._dynamo.testing import CompileCounter

    from tests.test_generate import make_model as confident_model

    model = confident_model()
    prompts = torch.randint(0, 23, (2, 5))
    torch._dynamo.reset()
    counter = CompileCounter()
    out = model.generate(prompts, 12, temperature=0, compile={"backend": counter})
    assert torch.equal(out, model.generate(prompts, 12, temperature=0)) and counter.frame_count == 1
    step, _ = next(iter(model._compiled_decode_steps.values()))
    assert step.capacity == 64  # 16 tokens, rounded up: headroom, so no step reads the whole buffer
    lengths = torch.tensor([2, 5])
    ragged = model.generate(prompts, 12, temperature=0, lengths=lengths, compile={"backend": counter})
    assert torch.equal(ragged, model.generate(prompts, 12, temperature=0, lengths=lengths))
    assert counter.frame_count == 2
    exact = KVCache(batch_size=2, capacity=5 + 12 - 1, **model.cache_spec())
    assert torch.equal(model.generate(prompts, 12, temperature=0, cache=exact, compile={"backend": counter}), out)
    assert exact.lengths.tolist() == [16, 16]


def test_compiled_generation_of_other_lengths_reuses_the_compiled_step():
    """Other prompt and generation lengths fit the cache of the first call (a size bucket; on the
    CPU a larger cache serves shorter generations): no new compile, and the eager tokens."""
    from torch._dynamo.testing import CompileCounter

    from tests.test_generate import make_model as confident_model

    model = confident_model()
    torch._dynamo.reset()
    counter = CompileCounter()
    for prompt_len, new in ((5, 40), (5, 12), (9, 3), (2, 30)):
        prompts = torch.randint(0, 23, (2, prompt_len))
        out = model.generate(prompts, new, temperature=0, compile={"backend": counter})
        assert torch.equal(out, model.generate(prompts, new, temperature=0)), (prompt_len, new)
    assert counter.frame_count == 1 and model._compiled_decode_cache.capacity == 64
    learned = Decoder(vocab_size=23, dim=16, num_layers=2, num_heads=2, positional="learned", max_positions=20).eval()
    prompts = torch.randint(0, 23, (2, 5))
    for new in (15, 16):  # 19 and 20 tokens: a cache of the whole table (the last step of 20 runs eagerly)
        out = learned.generate(prompts, new, temperature=0, compile={"backend": "eager"})
        assert torch.equal(out, learned.generate(prompts, new, temperature=0))
        assert learned._compiled_decode_cache.capacity == 20


def test_cache_bucket_sizes():
    from qkv.nn.generation import cache_bucket

    assert [cache_bucket(n) for n in (1, 63, 64, 200, 1023, 1024, 5000)] == [64, 64, 128, 256, 1024, 2048, 5120]
    assert cache_bucket(70, limit=100) == 100  # a learned position table of 100: never beyond it
    assert cache_bucket(100, limit=100) == 100  # no room for headroom: exactly what is needed
    for n in range(1, 3000, 7):
        size = cache_bucket(n)
        assert n + 1 <= size <= max(64, 2 * (n + 1), n + 1 + 1024), n


def test_decode_step_called_directly_equals_a_model_step():
    """Uncompiled, over all slots under a key mask (what CUDA graphs replay), rows at different
    positions: the logits of the eager step."""
    model = make_model()
    ids = torch.randint(0, 37, (2, 7))
    lengths = torch.tensor([4, 6])
    cache = KVCache(batch_size=2, capacity=10, **model.cache_spec())
    eager = KVCache(batch_size=2, capacity=10, **model.cache_spec())
    with torch.no_grad():
        model(ids[:, :6], cache, lengths=lengths)
        model(ids[:, :6], eager, lengths=lengths)
        cache.k[:, 0, :, 4:] = float("nan")  # never-written slots: prepare() zeroes them
        step = DecodeStep(model, cache)
        step.prepare()
        tokens = ids[:, 6:]
        with fused_projections(model, step.fused):
            got = step(tokens, lengths)
        expected = model(tokens, eager)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cpu_step_attention_by_reductions_matches_the_reference(dtype):
    """The compiled CPU step's one-query attention (two reductions, not SDPA): grouped heads, a
    key mask, a NaN query giving a NaN row; float64 to the reference's rounding, lower precisions
    within twice the error of SDPA in the same dtype."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 6, 1, 16, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 3, 2, 40, 16, generator=g, dtype=torch.float64)
    lengths = torch.tensor([40, 7, 23])
    mask = (torch.arange(40) < lengths[:, None])[:, None, None, :]
    q[2, 5, 0, 3] = float("nan")
    want = qkv.attention(q, k, v, mask, backend="reference")
    got = StaticCacheLayer._one_query(q.to(dtype), k.to(dtype), v.to(dtype), mask)
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.isnan(got[2, 5]).all() and not torch.isnan(got[:2]).any() and not torch.isnan(got[2, :5]).any()
    finite = torch.isfinite(want)
    err = (got.double() - want)[finite].abs().max()
    if dtype == torch.float64:
        assert err < 1e-12, err
    else:
        sdpa = torch.nn.functional.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask,
                                                                enable_gqa=True)
        assert err <= 2 * (sdpa.double() - want)[finite].abs().max() + 1e-6, err


def test_compile_refuses_what_the_fixed_shape_step_cannot_serve():
    with pytest.raises(ValueError, match="compile: .*positional='alibi'"):
        make_model(positional="alibi").generate(torch.zeros(1, 3, dtype=torch.int64), 4, temperature=0, compile=True)
    model = make_model()
    pool = PagedKVCache(num_pages=4, page_size=4, **model.cache_spec())
    with pytest.raises(ValueError, match="compile: .*KVCache"):
        model.generate(torch.zeros(1, 3, dtype=torch.int64), 4, temperature=0, cache=pool.batch([pool.add_sequence()]),
                       compile=True)
    with pytest.raises(ValueError, match="layout"):
        DecodeStep(model, KVCache(2, 1, 8, 1, 4, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs, mode='reduce-overhead')")
def test_cuda_graph_decode_step():
    from tests.test_generate import make_model as confident_model

    model = confident_model().float().cuda()
    prompts = torch.randint(0, 23, (2, 5), device="cuda")
    expected = model.generate(prompts, 8, temperature=0)
    assert torch.equal(model.generate(prompts, 8, temperature=0, compile=True), expected)
