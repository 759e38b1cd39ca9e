"""Fused projections for decoding (qkv.nn.fused): inside the block a step runs one product for
q/k/v and one for gate/up, and calls norms and output projections directly, with the numbers of the
modules' own calls; hooks, grad mode, many rows and weight changes are respected; state is untouched.
And the pieces of the decode hot path they rely on: a heads-last rotation, the NaN-row check."""

import pytest
import torch
import torch.nn.functional as F

from qkv.backends.sdpa import non_finite_rows
from qkv.cache import KVCache
from qkv.nn import RotaryEmbedding
from qkv.nn.fused import MAX_ROWS, build, fused_projections
from qkv.nn.positional import Rotation
from tests.decoders import TOL, make_model


def count_linear_calls(monkeypatch) -> list:
    calls = []
    original = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **kw: calls.append(a[1].shape) or original(*a, **kw))
    return calls


def decode_step(model, ids, cache):
    with torch.no_grad():
        model(ids[:, :-1], cache)
        return model(ids[:, -1:], cache)


def test_a_fused_step_equals_the_modules_calls_and_runs_fewer_products(monkeypatch):
    model = make_model(num_layers=3)
    ids = torch.randint(0, 37, (2, 9))
    expected = decode_step(model, ids, KVCache(batch_size=2, capacity=9, **model.cache_spec()))
    calls = count_linear_calls(monkeypatch)
    cache = KVCache(batch_size=2, capacity=9, **model.cache_spec())
    with torch.no_grad():
        model(ids[:, :-1], cache)
        calls.clear()
        with fused_projections(model):
            step = model(ids[:, -1:], cache)
    torch.testing.assert_close(step, expected, **TOL)
    assert len(calls) == 4 * 3 + 1  # qkv, out, gate_up, down per layer; the head (7 per layer unfused)
    assert all(m.__dict__.get("_fused") is None for m in model.modules())  # nothing left behind


def test_fused_block_respects_hooks_grad_mode_and_many_rows(monkeypatch):
    model = make_model()
    ids = torch.randint(0, 37, (2, 6))
    seen = []
    handle = model.blocks[0].attn.q_proj.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    with torch.no_grad(), fused_projections(model):
        model(ids[:, :1])
    handle.remove()
    assert seen == [(2, 1, 16)]  # the hooked projection ran itself
    calls = count_linear_calls(monkeypatch)
    with fused_projections(model):
        model(ids[:, :1]).sum().backward()  # grad mode on: the modules' own products
    assert len(calls) == 7 * 2 + 1 and model.blocks[0].attn.q_proj.weight.grad is not None
    calls.clear()
    rows = MAX_ROWS // 2 + 1
    with torch.no_grad(), fused_projections(model):
        model(torch.randint(0, 37, (2, rows)))  # a prefill: separate products (a reference call for out/down)
    assert sum(shape[0] == 3 * 16 for shape in calls) == 0


def test_state_dict_untouched_and_later_weight_changes_seen():
    model = make_model()
    keys = list(model.state_dict())
    prompt = torch.randint(0, 37, (2, 4))
    model.generate(prompt, 5, temperature=0)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        model.blocks[1].mlp.up.weight.mul_(-1.5)
        model.blocks[0].attn.k_proj.weight.add_(0.3)
    cache = KVCache(batch_size=2, capacity=8, **model.cache_spec())
    fresh = model.generate(prompt, 5, temperature=0, cache=cache)
    expected = prompt
    for _ in range(5):  # recomputation without any fused block
        with torch.no_grad():
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(fresh, expected[:, 4:])


def test_compiled_step_refreshes_its_stacks_when_the_weights_change():
    model = make_model()
    prompt = torch.randint(0, 37, (2, 4))
    torch._dynamo.reset()
    model.generate(prompt, 6, temperature=0, compile={"backend": "eager"})
    with torch.no_grad():
        model.blocks[0].mlp.gate.weight.mul_(2.0)
        model.lm_head.weight.add_(0.1)
    assert torch.equal(model.generate(prompt, 6, temperature=0, compile={"backend": "eager"}),
                       model.generate(prompt, 6, temperature=0))


def test_stacks_of_a_compiled_cpu_step_are_transposed_copies():
    model = make_model()
    stacks = build(model, transposed=True)
    attn = stacks[model.blocks[0].attn]
    assert attn.proj.weight.shape == (16 + 2 * 8, 16) and attn.proj.weight.t().is_contiguous()
    assert torch.equal(attn.proj.weight, torch.cat([model.blocks[0].attn.q_proj.weight,
                                                    model.blocks[0].attn.k_proj.weight,
                                                    model.blocks[0].attn.v_proj.weight]))
    head = stacks[model].out
    assert torch.equal(head.weight, model.lm_head.weight) and head.weight.data_ptr() != model.lm_head.weight.data_ptr()
    eager = build(model)  # not transposed: stacked copies only where there are several layers
    assert eager[model].out.weight is model.lm_head.weight


@pytest.mark.parametrize("options", [{}, {"rotary_dim": 4}, {"interleaved": True}])
def test_heads_last_rotation_is_the_same_rotation(options):
    rope = RotaryEmbedding(8, **options)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)  # (B, N, H, D)
    positions = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 3, 4]])
    rotation = rope.rotation(positions, 5, dtype=x.dtype, device=x.device)
    assert isinstance(rotation, Rotation)
    assert torch.equal(rotation.heads_last(x), rotation(x.transpose(1, 2)).transpose(1, 2))
    with pytest.raises(ValueError, match="rotation: expected x"):
        rotation.heads_last(x.transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_non_finite_rows(dtype):
    x = (torch.randn(3, 4, 5, 16) * 300).to(dtype)
    x[0, 1, 2, 3], x[1, 0, 0, 0], x[2, 3, 4, 15] = float("nan"), float("inf"), -float("inf")
    x[2, 2, 2] = torch.finfo(dtype).max  # a sum of these would overflow; x * 0 does not
    assert torch.equal(non_finite_rows(x), ~torch.isfinite(x).all(-1, keepdim=True))
    assert int(non_finite_rows(x).sum()) == 3
