"""The ``flex`` backend (FlexAttention fed by qkv's block view) against the float64 reference.

Most cases run Flex's unfused path (``FlexBackend(compiled=False)``: the same mask_mod, score_mod
and BlockMask, Flex's own math, float64 included). Two compiled kinds on CPU, in a fresh process
(``tests/flex_compiled_cpu.py``, run alongside the suite), check the compiled kernel with score
modifiers, and that changing window sizes, lengths, document ids, prefix lengths, batch and
sequence length does not recompile. Flex has no backward on CPU, so gradient cases run on CUDA only.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.backends import REGISTRY, FlexBackend, flex
from qkv.masks import FULL, PARTIAL
from qkv.problem import make_problem
from tests import background
from tests.flex_compiled_cpu import close
from tests.strategies import cases

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward and Triton kernels need CUDA")


@pytest.fixture(scope="module", autouse=True)
def unfused_flex():
    REGISTRY["flex_unfused"] = FlexBackend(compiled=False, name="flex_unfused")
    yield
    REGISTRY.pop("flex_unfused", None)


@settings(max_examples=20)
@given(case=cases(grad=False), return_lse=st.booleans())
def test_unfused_flex_matches_reference_on_every_mask_and_score_mod(case, return_lse):
    """All masks and compositions, score mods, bias, GQA, Nq != Nk, Dv != D, empty rows, lse."""
    kw = dict(case.kwargs, return_lse=return_lse)
    want = qkv.attention(case.q, case.k, case.v, **kw, backend="reference")
    got = qkv.attention(case.q, case.k, case.v, **kw, backend="flex_unfused")
    if return_lse:
        close(got[0], want[0], 1e-9, f"out [{case.label}]")
        close(got[1], want[1], 1e-9, f"lse [{case.label}]")
        assert got[1].dtype == want[1].dtype
    else:
        close(got, want, 1e-9, f"out [{case.label}]")


@settings(max_examples=10)
@given(case=cases(grad=False, mask_kinds=["causal", "window", "padding", "prefix", "global", "function"]),
       q_shift=st.integers(-3, 20), k_offset=st.integers(0, 9), per_batch=st.booleans())
def test_unfused_flex_with_explicit_positions(case, q_shift, k_offset, per_batch):
    """Explicit q_offset / k_offset (ints or per batch element) reach mask_mod and score_mod."""
    batch = case.q.shape[0]
    q_off = k_offset + q_shift
    if per_batch:
        q_off, k_offset = torch.arange(batch) + q_off, torch.arange(batch) * 2 + k_offset
    kw = dict(case.kwargs, q_offset=q_off, k_offset=k_offset, return_lse=True)
    want = qkv.attention(case.q, case.k, case.v, **kw, backend="reference")
    got = qkv.attention(case.q, case.k, case.v, **kw, backend="flex_unfused")
    close(got[0], want[0], 1e-9, f"out [{case.label}]")
    close(got[1], want[1], 1e-9, f"lse [{case.label}]")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_plain_math(dtype):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 150, 32, generator=g) for _ in range(3))
    for mask, mod in ((qkv.sliding_window(20), None), (qkv.document(torch.arange(150) // 40, causal=True),
                                                         qkv.scores.alibi(4))):
        want = qkv.attention(q.double(), k.double(), v.double(), mask, score_mod=mod, backend="reference")
        plain = qkv.attention(*(t.to(dtype) for t in (q, k, v)), mask, score_mod=mod, backend="reference")
        exact = want.to(dtype)  # what the dtype can hold
        got = qkv.attention(*(t.to(dtype) for t in (q, k, v)), mask, score_mod=mod, backend="flex_unfused")
        assert got.dtype == dtype
        err, base = (got.double() - want).abs().max(), (plain.double() - want).abs().max()
        assert err <= 2 * base + 2 * (exact.double() - want).abs().max(), f"{dtype} {mask!r}: {err:.3g} vs {base:.3g}"


def test_block_mask_is_qkv_block_view_per_batch():
    """Per-batch lengths give per-batch block lists; tiles in from_kv_blocks order."""
    q = torch.randn(2, 2, 300, 16)
    problem = make_problem(q, q, q, qkv.key_padding(torch.tensor([100, 300])) & qkv.causal())
    blocks = flex.kv_blocks(problem)
    assert blocks.kv_num_blocks.shape == (2, 1, 3) and blocks.kv_indices.shape == (2, 1, 3, 3)
    # batch 0: keys < 100 only, so every query tile sees key tile 0, partially (padding or diagonal)
    assert blocks.kv_num_blocks[0, 0].tolist() == [1, 1, 1] and blocks.full_kv_num_blocks[0, 0].tolist() == [0, 0, 0]
    # batch 1: causal, diagonal tiles partial, tiles below full
    assert blocks.kv_num_blocks[1, 0].tolist() == [1, 1, 1] and blocks.full_kv_num_blocks[1, 0].tolist() == [0, 1, 2]
    assert blocks.kv_indices[1, 0, :, 0].tolist() == [0, 1, 2]
    assert blocks.full_kv_indices[1, 0, 2, :2].tolist() == [0, 1]
    kinds = flex.tile_kinds(problem)
    assert int((kinds == PARTIAL).sum()) == int(blocks.kv_num_blocks.sum())
    assert int((kinds == FULL).sum()) == int(blocks.full_kv_num_blocks.sum())
    dense = flex.block_mask(problem).to_dense()  # Flex's own view of the BlockMask we built
    assert dense.shape == (2, 1, 3, 3) and dense[0, 0].tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0]]


def test_block_mask_is_built_once_per_mask_shapes_and_tables():
    """The BlockMask is kept on the layout cached on the user's mask object: the same mask and
    shapes reuse it (no per-call rebuild); other positions, lengths or a table changed in place
    get their own, and the results stay right."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 300, 16, generator=g) for _ in range(3))
    ids = torch.arange(300) // 70
    mask = qkv.document(ids) & qkv.sliding_window(90)
    first = flex.block_mask(make_problem(q, k, v, mask))
    assert flex.block_mask(make_problem(q, k, v, mask)) is first
    short = flex.block_mask(make_problem(q[:, :, :200], k, v, mask))  # another Nq (bottom-right)
    assert short is not first and flex.block_mask(make_problem(q[:, :, :200], k, v, mask)) is short
    assert flex.block_mask(make_problem(q[:, :, :200], k, v, mask, q_offset=0)) is not short  # top-left
    ids[:150] = 0  # in place: a different mask
    rebuilt = flex.block_mask(make_problem(q, k, v, mask))
    assert rebuilt is not first
    for _ in range(2):  # served from the cache, still right
        got = qkv.attention(q, k, v, mask, backend="flex_unfused")
        want = qkv.attention(q.double(), k.double(), v.double(), mask, backend="reference")
        close(got, want, 1e-5, "cached block mask")


def test_finite_check_is_one_reduction_and_exact():
    t = torch.randn(3, 4, 50, 8)
    assert flex.all_finite(t)
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[1, 2, 3, 4] = bad
        assert not flex.all_finite(u)
    big = torch.full((4, 1000), 3e38)  # the float32 sum overflows, every value is finite
    assert flex.all_finite(big) and flex.all_finite(torch.full((4, 1000), 6e4, dtype=torch.float16))
    big[2, 7] = float("nan")
    assert not flex.all_finite(big)


def test_unsupported_reasons_are_in_words():
    q = torch.randn(1, 2, 64, 16)
    backend = REGISTRY["flex"]
    reasons = backend.unsupported(make_problem(q, q, q, dropout_p=0.1))
    assert any("dropout" in r for r in reasons)
    reasons = backend.unsupported(make_problem(q.double(), q.double(), q.double(), return_lse=True))
    assert any("float64" in r for r in reasons) and any("return_lse" in r for r in reasons)
    qg = q.clone().requires_grad_()
    assert any("backward on CPU" in r for r in backend.unsupported(make_problem(qg, q, q)))
    meta = torch.empty(1, 2, 64, 16, device="meta")
    assert backend.unsupported(make_problem(meta, meta, meta)) == ["meta tensors: nothing to run"]


def test_small_calls_never_wait_for_a_compile():
    before = flex.compile_count()
    q = torch.randn(1, 12, 128, 32)
    for _ in range(3):  # a MiniLM-sized layer, and a decode step
        d = qkv.explain_dispatch(q, q, q, qkv.key_padding(100))
        assert d.chosen != "flex" and "compile pending" in str(d)
        qkv.attention(q, q, q, qkv.key_padding(100))
        qkv.attention(q[:, :, -1:], q, q, qkv.causal())
    assert flex.compile_count() == before


def test_ski_rental_compiles_once_the_savings_cover_the_compile(monkeypatch):
    """Repeated auto calls that flex would serve faster earn its compile back, then switch."""
    backend = REGISTRY["flex"]
    q = torch.randn(1, 1, 64, 16)
    problem = make_problem(q, q, q, qkv.sliding_window(3))
    others = {"tiled": 1.0, "flex": backend.estimate(problem)}
    run = flex.estimate_seconds(problem)
    monkeypatch.setattr(flex, "_CREDIT", {})
    compile_s = flex.compile_seconds(problem)
    calls = 0
    while backend.rent(problem) > 0:
        backend.observe(problem, others, "tiled")
        calls += 1
    assert calls == int(-(-compile_s // (1.0 - run)))


#: tests/flex_compiled_cpu.py in a fresh process with an empty inductor cache, started at collection
#: (tests/background.py) so that its compiles run alongside the rest of the suite.
COMPILED_CPU = background.child("flex compiled cpu", ["tests/flex_compiled_cpu.py"], fresh_inductor_cache=True,
                                env={"PYTHONPATH": background.python_path()})


def compiled_cpu_check(name: str) -> None:
    result = COMPILED_CPU.result(timeout=600)
    lines = result.stdout.splitlines()
    assert f"{name}: ok" in lines, result.stdout[-4000:] + result.stderr[-3000:]


@pytest.mark.background_child("flex compiled cpu")
def test_compiled_flex_on_cpu_matches_and_does_not_recompile():
    """One compiled kind: window, prefix, document ids, key lengths (one of them 0: empty rows),
    batch and sequence length all change, and the compile count does not move after the first
    (``flex_compiled_cpu.no_recompile``)."""
    compiled_cpu_check("no recompile")


@pytest.mark.background_child("flex compiled cpu")
def test_compiled_flex_on_cpu_compiles_alibi_and_a_soft_cap():
    """Two bugs of torch's CPU Flex template, one compile (``flex_compiled_cpu.modifiers_compile``,
    first in a fresh process, where it failed without either fix). (1) It turned ``ks1`` into
    ``cur_qSplitSize`` by text replacement, so a captured size named ``ks15`` became
    ``cur_qSplitSize5``: C++ that does not compile, and ALiBi fell back to tiled (so did
    relative_bias); qkv's compiles name the tile sizes directly (``qkv.backends.flex_cpu_fix``).
    (2) A soft cap's float handed over as a symbol failed ("unbacked_bindings"); qkv makes it a
    constant of the kernel (floats are part of a kind anyway). One compile for two lengths."""
    compiled_cpu_check("modifiers compile")


def test_the_template_fix_leaves_torch_as_it_was():
    """The fix is in place only inside the context (qkv's own compiled CPU calls), and nests."""
    from qkv.backends.flex_cpu_fix import _template_parts, fixed_cpu_template

    parts = _template_parts()
    if parts is None:
        pytest.skip("this torch has no C++ Flex template")
    template, cpp = parts
    before, group = template.modification, cpp.KernelGroup
    with fixed_cpu_template():
        fixed = template.modification
        assert fixed is not before and fixed.qkv_fix
        with fixed_cpu_template():
            assert template.modification is fixed
        assert template.modification is fixed
    assert template.modification is before and cpp.KernelGroup is group


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_flex_gradients_including_score_mod_tensors(dtype):
    g = torch.Generator().manual_seed(0)
    n = 300
    table = (torch.randn(4, 33, generator=g) * 0.3).cuda().requires_grad_()
    masks = [qkv.causal(), qkv.sliding_window(40) | qkv.global_tokens([0, 7]),
             qkv.document(torch.arange(n) * 3 // n, causal=True) & qkv.key_padding(torch.tensor([0, 250]))]
    for mask in masks:
        q, k, v = (torch.randn(2, 4, n, 64, generator=g).cuda() for _ in range(3))
        k, v = k[:, :2], v[:, :2]
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
        mod = qkv.scores.relative_bias(table)
        out, lse = qkv.attention(*inputs, mask, score_mod=mod, backend="flex", return_lse=True)
        grads = torch.autograd.grad(out.float().square().sum(), [*inputs, table])
        table64 = table.detach().double().requires_grad_()
        ref_out, ref_lse = qkv.attention(*ref_inputs, mask, score_mod=qkv.scores.relative_bias(table64),
                                         backend="reference", return_lse=True)
        ref_grads = torch.autograd.grad(ref_out.square().sum(), [*ref_inputs, table64])
        tol = 2e-4 if dtype == torch.float32 else 5e-2
        close(out, ref_out, tol, f"{mask!r} out")
        close(lse, ref_lse, tol, f"{mask!r} lse")
        for i, (gr, rg) in enumerate(zip(grads, ref_grads)):
            close(gr, rg, tol * max(1.0, rg.abs().max().item()), f"{mask!r} grad[{i}]")


@cuda
def test_cuda_auto_picks_flex_for_large_masked_problems_once_compiled():
    """Once its kind is compiled, flex's estimate beats SDPA's dense mask (at N=4096 the per-call
    cost still loses to it) and every other peer but ``triton``, whose guessed CUDA rates send
    masked problems to it until measured (docs/triton.md): auto picks one of the two."""
    q = torch.randn(1, 8, 8192, 64, device="cuda", dtype=torch.bfloat16)
    qkv.attention(q, q, q, qkv.sliding_window(256), backend="flex")
    d = qkv.explain_dispatch(q, q, q, qkv.sliding_window(512))
    assert not REGISTRY["flex"].compile_pending(d.problem)
    peers = [e for name, e in d.estimates.items() if e is not None and name not in ("flex", "triton")]
    assert d.estimates["flex"] < min(peers) and d.chosen in ("flex", "triton"), d
    assert qkv.explain_dispatch(q, q, q).chosen == "sdpa"


def test_the_unchecked_kernel_is_asked_for_only_on_cuda_at_multiples_of_the_tile():
    from qkv.backends.flex import BLOCK, kernel_options

    assert kernel_options("cuda", 8192, 4 * BLOCK) == {"IS_DIVISIBLE": True}
    assert kernel_options("cuda", 8192, 8191) is None and kernel_options("cuda", 1, 8192) is None
    assert kernel_options("cpu", 8192, 8192) is None


@cuda
def test_cuda_flex_lengths_on_and_off_the_tile_share_at_most_two_compiles():
    """Lengths that are multiples of 128 run the kernel without bounds checks, the others the
    checked one: both exact, one compile for each class, none for a new length in a class."""
    from qkv.backends.flex import compile_count

    g = torch.Generator().manual_seed(3)
    counts = []
    for n in (384, 300, 512, 333):
        q, k, v = (torch.randn(1, 4, n, 64, generator=g).cuda() for _ in range(3))
        mask = qkv.sliding_window(100) | qkv.global_tokens([0])
        out = qkv.attention(q, k, v, mask, backend="flex")
        ref = qkv.attention(q.double(), k.double(), v.double(), mask, backend="reference")
        close(out, ref, 2e-4, f"N={n}")
        counts.append(compile_count())
    assert counts[1] == counts[0] + 1 and counts[3] == counts[2] == counts[1], counts
