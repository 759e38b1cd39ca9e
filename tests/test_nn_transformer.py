"""Encoder and Decoder stacks: each equals its blocks composed by hand (float64, 1e-10: only
summation order differs), causality, weight tying and initialisation, encoder-decoder, errors."""

import math

import pytest
import torch

import qkv
from qkv.nn import Decoder, DecoderConfig, Encoder, SinusoidalEmbedding

TOL = dict(atol=1e-10, rtol=1e-10)


def test_encoder_with_tokens_and_sinusoidal_positions_equals_composition():
    torch.manual_seed(0)
    enc = Encoder(16, 2, 4, 32, vocab_size=50, positional="sinusoidal").double()
    ids = torch.randint(0, 50, (2, 7))
    x = enc.token_embedding(ids) + SinusoidalEmbedding(16)(torch.arange(7), dtype=torch.float64)
    for block in enc.blocks:
        x = block(x)
    torch.testing.assert_close(enc(ids), enc.norm(x), **TOL)


@pytest.mark.parametrize("positional", ["rope", "alibi", "none"])
def test_encoder_on_embeddings_equals_composition(positional):
    torch.manual_seed(1)
    enc = Encoder(12, 2, 3, 24, positional=positional, norm_first=False, norm="rmsnorm").double()
    assert enc.norm is None  # post-norm: no final norm by default
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    h = x
    for block in enc.blocks:
        h = block(h, rope=enc.rope, score_mod=qkv.scores.alibi(3, symmetric=True) if positional == "alibi" else None)
    torch.testing.assert_close(enc(x), h, **TOL)


def test_encoder_padding_is_invisible_to_real_tokens():
    torch.manual_seed(2)
    enc = Encoder(8, 2, 2, 16, vocab_size=20, positional="learned", max_positions=10).double()
    ids = torch.randint(0, 20, (2, 6))
    other = ids.clone()
    other[1, 4:] = torch.randint(0, 20, (2,))
    mask = qkv.key_padding([6, 4])
    torch.testing.assert_close(enc(ids, mask=mask)[1, :4], enc(other, mask=mask)[1, :4], **TOL)


def make_decoder(**options) -> Decoder:
    torch.manual_seed(3)
    defaults = dict(vocab_size=40, dim=16, num_layers=2, num_heads=4)
    return Decoder(**{**defaults, **options}).double().eval()


@pytest.mark.parametrize("positional", ["rope", "alibi", "learned", "sinusoidal", "none"])
def test_decoder_equals_composition_and_is_causal(positional):
    model = make_decoder(positional=positional, max_positions=32, num_kv_heads=2)
    ids = torch.randint(0, 40, (2, 9))
    x = model.token_embedding(ids)
    if positional == "learned":
        x = x + model.position_embedding(torch.arange(9))
    if positional == "sinusoidal":
        x = x + SinusoidalEmbedding(16)(torch.arange(9), dtype=torch.float64)
    score_mod = qkv.scores.alibi(4) if positional == "alibi" else None
    for block in model.blocks:
        x = block(x, mask=qkv.causal(), rope=model.rope, score_mod=score_mod)
    logits = model(ids)
    torch.testing.assert_close(logits, model.lm_head(model.norm(x)), **TOL)
    changed = ids.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 40
    torch.testing.assert_close(model(changed)[:, :5], logits[:, :5], **TOL)
    assert not torch.allclose(model(changed)[:, 5:], logits[:, 5:])


def test_weight_tying_and_initialisation():
    tied, untied = make_decoder(), make_decoder(tie_weights=False)
    assert tied.lm_head.weight is tied.token_embedding.weight
    assert untied.lm_head.weight is not untied.token_embedding.weight
    assert len(list(tied.parameters())) == len(list(untied.parameters())) - 1
    big = Decoder(vocab_size=2000, dim=256, num_layers=8, num_heads=4)
    assert big.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert big.blocks[0].mlp.gate.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(16)
    assert big.blocks[0].attn.out_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert big.blocks[0].mlp.down.weight.std().item() == pytest.approx(residual, rel=0.05)


def test_config_and_cache_spec():
    config = DecoderConfig(vocab_size=10, dim=8, num_layers=3, num_heads=2, num_kv_heads=1)
    model = Decoder(config, activation="gelu", bias=True)
    assert model.config == DecoderConfig(vocab_size=10, dim=8, num_layers=3, num_heads=2, num_kv_heads=1,
                                         activation="gelu", bias=True)
    assert hasattr(model.blocks[0].mlp, "fc1")
    assert model.cache_spec() == dict(num_layers=3, num_kv_heads=1, head_dim=4, dtype=torch.float32,
                                      device=torch.device("cpu"))


def test_default_mlp_dim_is_four_times_dim():
    assert make_decoder().blocks[0].mlp.gate.out_features == 64
    assert make_decoder(mlp_dim=24).blocks[0].mlp.gate.out_features == 24


def test_lengths_without_a_cache_hide_right_padding():
    """Real tokens' logits equal those of the row alone, whatever the padding holds and whatever
    the mask; padding positions may lie beyond a learned table."""
    model = make_decoder(positional="learned", max_positions=8)
    ids = torch.randint(0, 40, (2, 10))
    other = ids.clone()
    other[1, 5:] = (other[1, 5:] + 1) % 40                     # different padding in row 1
    lengths = [8, 5]
    window = qkv.sliding_window(2, 2)                           # lets real tokens see two keys ahead
    for mask in (None, window, qkv.sliding_window(2, 2).dense(1, 1, 10, 10)):
        logits = model(ids, lengths=torch.tensor(lengths), mask=mask)
        torch.testing.assert_close(model(other, lengths=lengths, mask=mask)[1, :5], logits[1, :5], **TOL)
        for b, n in enumerate(lengths):
            alone_mask = None if mask is None else window
            torch.testing.assert_close(logits[b, :n], model(ids[b:b + 1, :n], mask=alone_mask)[0], **TOL)
    # without lengths the window would show row 1's real tokens its padding
    assert not torch.allclose(model(ids[:, :8], mask=window)[1, :5], model(ids, lengths=lengths, mask=window)[1, :5])


@pytest.mark.parametrize("lengths,error,match", [
    ([0, 3], ValueError, r"lengths must lie in \[1, 6\]"),
    ([3, 7], ValueError, r"lengths must lie in \[1, 6\]"),
    ([3], ValueError, r"lengths must have shape \(batch_size,\) = \(2,\)"),
    (torch.tensor([3.0, 2.0]), TypeError, "lengths must hold integers"),
])
def test_bad_lengths_without_a_cache(lengths, error, match):
    with pytest.raises(error, match=match):
        make_decoder()(torch.randint(0, 40, (2, 6)), lengths=lengths)


def test_lengths_and_an_additive_mask_do_not_combine():
    with pytest.raises(ValueError, match="mask: lengths cannot be combined with an additive float mask"):
        make_decoder()(torch.randint(0, 40, (2, 6)), lengths=[6, 4], mask=torch.zeros(6, 6, dtype=torch.float64))


def test_encoder_decoder():
    torch.manual_seed(4)
    encoder = Encoder(16, 1, 4, 32, vocab_size=30, positional="sinusoidal").double()
    decoder = make_decoder(cross_attention=True)
    src, tgt = torch.randint(0, 30, (2, 5)), torch.randint(0, 40, (2, 6))
    memory = encoder(src)
    logits = decoder(tgt, memory=memory, memory_mask=qkv.key_padding([5, 3]))
    assert logits.shape == (2, 6, 40)
    logits.sum().backward()
    assert encoder.token_embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs memory"):
        decoder(tgt)


@pytest.mark.parametrize("options,error,match", [
    (dict(positional="relative"), ValueError, "positional must be one of"),
    (dict(positional="learned"), ValueError, "needs max_positions"),
    (dict(vocab_size=0), ValueError, "vocab_size"),
    (dict(num_layers=1.5), ValueError, "num_layers"),
    (dict(dim=10, num_heads=4), ValueError, "divisible"),
    (dict(mlp_dim=0), ValueError, "mlp_dim must be a positive int, got 0"),
    (dict(mlp_dim=-4), ValueError, "mlp_dim must be a positive int"),
])
def test_bad_decoder_options(options, error, match):
    with pytest.raises(error, match=match):
        make_decoder(**options)


def test_bad_decoder_inputs():
    model = make_decoder(positional="learned", max_positions=8)
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="vocab_size=40"):
        model(torch.tensor([[1, 40]]))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"input_ids: sequence length 9 exceeds max_positions=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    encoder = Encoder(8, 1, 2, 16, vocab_size=20, positional="learned", max_positions=10)
    with pytest.raises(ValueError, match=r"x: sequence length 11 exceeds max_positions=10"):
        encoder(torch.zeros(1, 11, dtype=torch.long))
    with pytest.raises(TypeError, match="DecoderConfig"):
        Decoder({"vocab_size": 3})
    with pytest.raises(ValueError, match="float embeddings"):
        Encoder(8, 1, 2, 16)(torch.zeros(1, 3, dtype=torch.long))
