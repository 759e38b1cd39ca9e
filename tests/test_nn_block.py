"""TransformerBlock against torch's TransformerEncoderLayer / TransformerDecoderLayer (LayerNorm,
GELU/ReLU, pre- and post-norm, cross-attention) and against the written-out formula (RMSNorm,
SwiGLU, tanh-GELU). float64 with random weights and biases: agreement to ~1e-15, checked at 1e-10.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qkv
from qkv.nn import MultiHeadAttention, TransformerBlock

TOL = dict(atol=1e-10, rtol=1e-10)


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():  # norm scales near 1, everything else near 0
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return module.double().eval()


def load_torch_layer(block: TransformerBlock, layer: nn.Module) -> None:
    """Copy an nn.TransformerEncoderLayer / nn.TransformerDecoderLayer into ``block``."""
    block.attn.load_state_dict(MultiHeadAttention.from_torch(layer.self_attn).state_dict())
    block.mlp.fc1.load_state_dict(layer.linear1.state_dict())
    block.mlp.fc2.load_state_dict(layer.linear2.state_dict())
    block.attn_norm.load_state_dict(layer.norm1.state_dict())
    if block.cross_attn is not None:
        block.cross_attn.load_state_dict(MultiHeadAttention.from_torch(layer.multihead_attn).state_dict())
        block.cross_norm.load_state_dict(layer.norm2.state_dict())
        block.mlp_norm.load_state_dict(layer.norm3.state_dict())
    else:
        block.mlp_norm.load_state_dict(layer.norm2.state_dict())


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_encoder_block_equals_torch(norm_first, activation):
    layer = randomize(nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, activation=activation, batch_first=True,
                                                 norm_first=norm_first, layer_norm_eps=1e-6))
    block = TransformerBlock(16, 4, 24, norm_first=norm_first, activation=activation, norm_eps=1e-6,
                             fused_qkv=True).double().eval()
    load_torch_layer(block, layer)
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    torch.testing.assert_close(block(x), layer(x), **TOL)
    torch.testing.assert_close(block(x, mask=qkv.key_padding([9, 6, 9]))[[0, 2]],
                               layer(x, src_key_padding_mask=pad)[[0, 2]], **TOL)
    torch.testing.assert_close(block(x, mask=qkv.key_padding([9, 6, 9]))[1, :6],
                               layer(x, src_key_padding_mask=pad)[1, :6], **TOL)


@pytest.mark.parametrize("norm_first", [True, False])
def test_decoder_block_with_cross_attention_equals_torch(norm_first):
    layer = randomize(nn.TransformerDecoderLayer(16, 4, 24, dropout=0.0, batch_first=True, norm_first=norm_first))
    block = TransformerBlock(16, 4, 24, norm_first=norm_first, activation="relu", cross_attention=True,
                             fused_qkv=True).double().eval()
    block.cross_attn = MultiHeadAttention(16, 4, fused_qkv=True).double()  # torch's layout for loading
    load_torch_layer(block, layer)
    x, memory = torch.randn(2, 7, 16, dtype=torch.float64), torch.randn(2, 11, 16, dtype=torch.float64)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
    memory_pad = torch.zeros(2, 11, dtype=torch.bool)
    memory_pad[0, 8:] = True
    expected = layer(x, memory, tgt_mask=tgt_mask, tgt_is_causal=True, memory_key_padding_mask=memory_pad)
    ours = block(x, mask=qkv.causal(), memory=memory, memory_mask=qkv.key_padding([8, 11]))
    torch.testing.assert_close(ours, expected, **TOL)


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("norm_first", [True, False])
def test_rmsnorm_swiglu_block_equals_formula(norm_first):
    block = randomize(TransformerBlock(12, 3, 20, num_kv_heads=1, norm="rmsnorm", activation="swiglu", bias=False,
                                       norm_first=norm_first, norm_eps=1e-5))
    assert {n for n, _ in block.mlp.named_children()} >= {"gate", "up", "down"}
    x = torch.randn(2, 5, 12, dtype=torch.float64)

    def attn(h):
        return block.attn(h, mask=qkv.causal())

    def mlp(h):
        return block.mlp.down(F.silu(block.mlp.gate(h)) * block.mlp.up(h))

    def norm(module, h):
        return rms(h, module.weight, 1e-5)

    if norm_first:
        h = x + attn(norm(block.attn_norm, x))
        expected = h + mlp(norm(block.mlp_norm, h))
    else:
        h = norm(block.attn_norm, x + attn(x))
        expected = norm(block.mlp_norm, h + mlp(h))
    torch.testing.assert_close(block(x, mask=qkv.causal()), expected, **TOL)


def test_gelu_tanh_activation():
    block = randomize(TransformerBlock(8, 2, 16, activation="gelu_tanh"))
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    h = x + block.attn(block.attn_norm(x))
    hidden = block.mlp.fc1(block.mlp_norm(h))
    tanh_gelu = 0.5 * hidden * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (hidden + 0.044715 * hidden ** 3)))
    expected = h + block.mlp.fc2(tanh_gelu)
    torch.testing.assert_close(block(x), expected, **TOL)


def test_submodule_names_are_stable():
    names = {n for n, _ in TransformerBlock(8, 2, 16, cross_attention=True).named_children()}
    assert names == {"attn", "attn_norm", "cross_attn", "cross_norm", "mlp", "mlp_norm"}
    # a dropout module only where it drops something (p = 0 leaves none on the path)
    with_dropout = TransformerBlock(8, 2, 16, dropout=0.1)
    assert {n for n, _ in with_dropout.named_children()} == {"attn", "attn_norm", "mlp", "mlp_norm", "dropout"}
    assert with_dropout.mlp.dropout.p == 0.1 and TransformerBlock(8, 2, 16).mlp.dropout is None
    keys = set(TransformerBlock(8, 2, 16, norm_first=False).state_dict())
    assert {"attn.q_proj.weight", "attn.out_proj.bias", "attn_norm.weight", "mlp.fc1.weight", "mlp.fc2.bias",
            "mlp_norm.bias"} <= keys
    assert "attn_norm.bias" not in TransformerBlock(8, 2, 16, norm="rmsnorm").state_dict()
    assert "attn_norm.bias" not in TransformerBlock(8, 2, 16, bias=False).state_dict()


def test_memory_dim_and_gradients_flow():
    block = TransformerBlock(8, 2, 16, cross_attention=True, memory_dim=5).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    block(x, memory=memory).sum().backward()
    assert x.grad.abs().sum() > 0 and memory.grad.abs().sum() > 0
    assert all(p.grad is not None for p in block.parameters())


def test_residual_dropout_only_while_training():
    block = TransformerBlock(8, 2, 16, dropout=0.5).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    block.eval()
    torch.testing.assert_close(block(x), block(x), **TOL)
    block.train()
    assert not torch.allclose(block(x), block(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm must be one of"):
        TransformerBlock(8, 2, 16, norm="batchnorm")
    with pytest.raises(ValueError, match="activation must be one of"):
        TransformerBlock(8, 2, 16, activation="tanh")
    with pytest.raises(ValueError, match="mlp_dim"):
        TransformerBlock(8, 2, 0)
    block = TransformerBlock(8, 2, 16)
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="no cross-attention"):
        block(x, memory=x)
    with pytest.raises(ValueError, match="needs memory"):
        TransformerBlock(8, 2, 16, cross_attention=True)(x)
