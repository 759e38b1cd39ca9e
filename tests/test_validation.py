"""Bad input gets a clear error naming the argument and what was expected."""

import pytest
import torch

import qkv

q = torch.randn(2, 4, 5, 8)
k = torch.randn(2, 2, 6, 8)
v = torch.randn(2, 2, 6, 8)


@pytest.mark.parametrize("args,kwargs,error,message", [
    ((q[0], k, v), {}, ValueError, r"q must have 4 dims \(batch, heads, seq, head_dim\), got shape \(4, 5, 8\)"),
    ((q, k[None], v), {}, ValueError, "k must have 4 dims"),
    ((q, k, [1]), {}, TypeError, "v must be a torch.Tensor, got list"),
    ((q.long(), k, v), {}, TypeError, "q must be float64, float32, bfloat16 or float16, got torch.int64"),
    ((q, k.double(), v), {}, TypeError, "q, k, v must share one dtype"),
    ((q[:1], k, v), {}, ValueError, "q, k, v must share the batch size, got 1, 2, 2"),
    ((q, k, v[:, :1]), {}, ValueError, "k and v must have the same number of heads, got 2 and 1"),
    ((q, k, v[:, :, :3]), {}, ValueError, "k and v must have the same sequence length, got 6 and 3"),
    ((q, k[..., :4], v), {}, ValueError, "q and k must have the same head_dim, got 8 and 4"),
    ((q[:, :3], k, v), {}, ValueError, r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
    ((q, k, v), {"mask": torch.ones(5, 7, dtype=torch.bool)}, ValueError,
     r"mask: shape \(5, 7\) does not broadcast to \(B, H, Nq, Nk\) = \(2, 4, 5, 6\) \(Nk: 7 vs 6\)"),
    ((q, k, v), {"mask": torch.ones(3, 1, 5, 6)}, ValueError, r"\(batch: 3 vs 2\)"),
    ((q, k, v), {"mask": torch.ones(5, 6, dtype=torch.int32)}, TypeError, "mask must be bool"),
    ((q, k, v), {"mask": "causal"}, TypeError, "mask must be None, a qkv Mask"),
    ((q, k, v), {"mask": torch.ones(1, 1, 1, 5, 6)}, ValueError, "at most 4 dims"),
    ((q, k, v), {"scale": float("nan")}, ValueError, "scale must be a finite number"),
    ((q, k, v), {"dropout_p": 1.0}, ValueError, r"dropout_p must be a number in \[0, 1\)"),
    ((q, k, v), {"generator": 3}, TypeError, "generator must be a torch.Generator"),
    ((q, k, v), {"return_lse": "yes"}, TypeError, "return_lse must be True or False, got 'yes'"),
    ((q, k, v), {"score_mod": 3}, TypeError, "score_mod must be None"),
    ((q, k, v), {"backend": "flash"}, ValueError, r"backend must be None or one of \["),
    ((q, k, v), {"mask": qkv.key_padding([1, 2, 3])}, ValueError, "key_padding: lengths has 3 entries"),
])
def test_bad_input_is_named(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        qkv.attention(*args, **kwargs)


def test_forced_backend_that_cannot_serve_explains_why():
    with pytest.raises(ValueError, match=r"backend='sdpa' cannot run this problem: return_lse: .*Backends that can: "):
        qkv.attention(q, k, v, return_lse=True, backend="sdpa")
    with pytest.raises(ValueError, match="score_mod: SDPA has no score modifier hook"):
        qkv.attention(q, k, v, score_mod=qkv.scores.softcap(5.0), backend="sdpa")


def test_masks_on_another_device_are_rejected():
    meta_mask = torch.ones(5, 6, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="mask is on meta, but q is on cpu"):
        qkv.attention(q, k, v, meta_mask)
