"""Linear-complexity attention: kernelised attention with the ``elu + 1`` feature map
(Katharopoulos et al. 2020) and Performer's FAVOR+ random features (Choromanski et al. 2021).

Not a qkv backend: these compute a different function from softmax attention (``elu``) or an
estimate of it (Performer), in ``O(N)`` time and memory. Same layout as :func:`qkv.attention`.

>>> import torch, qkv
>>> from qkv.linear import linear_attention, performer_attention, PerformerFeatures
>>> q, k, v = torch.randn(2, 8, 1000, 64), torch.randn(2, 2, 1000, 64), torch.randn(2, 2, 1000, 64)
>>> linear_attention(q, k, v, qkv.causal()).shape
torch.Size([2, 8, 1000, 64])
>>> features = PerformerFeatures(head_dim=64, num_features=128, seed=0)
>>> out = performer_attention(q, k, v, qkv.key_padding([1000, 700]), features=features)
>>> features.redraw()  # a fresh, reproducible draw
"""

from .attention import kernel_attention, linear_attention, performer_attention, split_mask
from .features import PerformerFeatures, draw_projection, elu_plus_one
from .state import LinearAttentionState

__all__ = ["linear_attention", "performer_attention", "kernel_attention", "split_mask", "PerformerFeatures",
           "draw_projection", "elu_plus_one", "LinearAttentionState"]
