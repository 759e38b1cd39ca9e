"""A small float64 decoder with well-spread random weights, shared by the cache tests."""

import torch

from qkv.nn import Decoder

#: Cache decoding against a full pass in float64 differs only by summation order.
TOL = dict(atol=1e-10, rtol=1e-10)


def make_model(**options) -> Decoder:
    """``Decoder(vocab 37, dim 16, 2 layers, 4 query / 2 key-value heads)`` with ``options``
    replaced; weights ~ N(0, 0.3), norm scales ~ N(1, 0.2) so that every path matters."""
    torch.manual_seed(0)
    defaults = dict(vocab_size=37, dim=16, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=24)
    model = Decoder(**{**defaults, **options})
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return model.double().eval()
