"""What every cache shares: it stores detached keys and values (no autograd graph outlives a step,
gradients never flow into cached tokens, while a step's own new keys and values stay
differentiable), and it normalises its device so that the tensors a model passes match it.

float64 models with O(1) random weights; gradients through a cache and through a full pass differ
only in summation order (1e-10)."""

import pytest
import torch

from qkv.cache import KVCache, PagedKVCache, StreamingKVCache
from qkv.cache.base import check_layout
from tests.decoders import TOL, make_model



def contiguous(model, batch, **overrides):
    return KVCache(batch_size=batch, capacity=32, **(model.cache_spec() | overrides))


def paged(model, batch, **overrides):
    pool = PagedKVCache(num_pages=32, page_size=4, **(model.cache_spec() | overrides))
    return pool.batch([pool.add_sequence() for _ in range(batch)])


def streaming(model, batch, **overrides):  # a window longer than any test sequence: plain causal attention
    return StreamingKVCache(batch_size=batch, sinks=2, window=32, **(model.cache_spec() | overrides))


CACHES = {"contiguous": contiguous, "paged": paged, "streaming": streaming}


def buffers(cache) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(cache, (KVCache, StreamingKVCache)):
        return cache.k, cache.v
    return cache.pool.k_pages, cache.pool.v_pages


def graph_size(t: torch.Tensor) -> int:
    """Autograd nodes reachable from ``t``."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(child for child, _ in node.next_functions)
    return len(seen)


def parameter_grads(model, loss) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))


@pytest.mark.parametrize("kind", list(CACHES))
def test_cache_holds_no_autograd_graph(kind):
    model = make_model()
    ids = torch.randint(0, 37, (2, 9))
    cache = CACHES[kind](model, 2)
    assert torch.is_grad_enabled()
    model(ids[:, :5], cache, lengths=[5, 3])
    sizes = []
    for t in range(5, 9):
        logits = model(ids[:, t:t + 1], cache)
        assert logits.requires_grad
        for buffer in buffers(cache):
            assert not buffer.requires_grad and buffer.grad_fn is None
        sizes.append(graph_size(logits))
    assert len(set(sizes)) == 1, f"the autograd graph grows from step to step: {sizes}"


@pytest.mark.parametrize("lengths", [None, [7, 4]])
@pytest.mark.parametrize("kind", list(CACHES))
def test_a_step_over_whole_sequences_has_the_gradients_of_a_full_pass(kind, lengths):
    """Every key of the step is the step's own: all of them stay differentiable."""
    model = make_model()
    ids = torch.randint(0, 37, (2, 7))
    weights = torch.randn(2, 7, 37, dtype=torch.float64)
    real = [7, 7] if lengths is None else lengths
    logits = model(ids, CACHES[kind](model, 2), lengths=lengths)
    through_cache = sum((logits[b, :n] * weights[b, :n]).sum() for b, n in enumerate(real))
    full_pass = sum((model(ids[b:b + 1, :n])[0] * weights[b, :n]).sum() for b, n in enumerate(real))
    for got, expected in zip(parameter_grads(model, through_cache), parameter_grads(model, full_pass)):
        torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("kind", list(CACHES))
def test_decode_step_gradients_treat_cached_keys_as_constants(kind):
    model = make_model()
    ids = torch.randint(0, 37, (2, 7))
    weights = torch.randn(2, 1, 37, dtype=torch.float64)

    def step_grads(prefill_with_grad: bool):
        cache = CACHES[kind](model, 2)
        with torch.set_grad_enabled(prefill_with_grad):
            model(ids[:, :6], cache)
        return parameter_grads(model, (model(ids[:, 6:], cache) * weights).sum())

    constants = step_grads(prefill_with_grad=False)  # the cache surely holds constants
    for got, expected in zip(step_grads(prefill_with_grad=True), constants):
        torch.testing.assert_close(got, expected, **TOL)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    k_proj = constants[names.index("blocks.0.attn.k_proj.weight")]
    assert k_proj.abs().sum() > 0  # the new token's own key is differentiable (it attends to itself)


@pytest.mark.parametrize("kind", list(CACHES))
def test_backward_of_an_earlier_step_after_later_steps(kind):
    """Later steps overwrite the cache's buffers; no earlier step's graph may have saved them."""
    model = make_model()
    ids = torch.randint(0, 37, (2, 8))

    def step_after_prefill(cache):
        model(ids[:, :5], cache)
        return model(ids[:, 5:6], cache).sum()

    expected = parameter_grads(model, step_after_prefill(CACHES[kind](model, 2)))
    cache = CACHES[kind](model, 2)
    first = step_after_prefill(cache)
    for t in range(6, 8):
        model(ids[:, t:t + 1], cache)
    for got, want in zip(parameter_grads(model, first), expected):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("device", ["cpu:0", torch.device("cpu", 0), None])
@pytest.mark.parametrize("kind", list(CACHES))
def test_device_is_normalised_to_what_tensors_report(kind, device):
    """``torch.device("cpu:0") != torch.device("cpu")``, yet tensors made on "cpu:0" report "cpu"
    (as tensors made on "cuda" report "cuda:0"): the cache must accept them."""
    model = make_model()
    ids = torch.randint(0, 37, (2, 6))
    cache = CACHES[kind](model, 2, device=device)
    assert cache.device == torch.device("cpu") and buffers(cache)[0].device == cache.device
    pieces = [model(ids[:, :4], cache)] + [model(ids[:, t:t + 1], cache) for t in (4, 5)]
    torch.testing.assert_close(torch.cat(pieces, 1), model(ids), **TOL)


def test_check_layout_normalises_devices():
    assert check_layout(1, 1, 1, torch.float32, "cpu:0") == torch.device("cpu")
    assert check_layout(1, 1, 1, torch.float32, None) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", list(CACHES))
def test_cuda_device_without_an_index(kind):
    model = make_model().cuda()
    ids = torch.randint(0, 37, (2, 6), device="cuda")
    cache = CACHES[kind](model, 2, device="cuda")
    assert cache.device == torch.device("cuda", torch.cuda.current_device())
    pieces = [model(ids[:, :4], cache)] + [model(ids[:, t:t + 1], cache) for t in (4, 5)]
    torch.testing.assert_close(torch.cat(pieces, 1), model(ids), atol=1e-8, rtol=1e-8)
