"""qkv: self-attention for PyTorch, from the math to the fastest kernels.

One entry point, :func:`attention`, serves every variant; masks (:mod:`qkv.masks`) and score
modifiers (:mod:`qkv.scores`) describe the problem, backends (:mod:`qkv.backends`) solve it, and
:func:`explain_dispatch` tells which one runs and why.
"""

from . import masks, scores
from .attention import attention, attention_weights
from .dispatch import explain_dispatch
from .masks import (Mask, block_sparse, causal, document, from_function, from_tensor, global_tokens,
                    key_padding, prefix_lm, sliding_window)
from .merge import merge_partials
from .sparse_patterns import bigbird, dilated_window, longformer, sparse_fixed, sparse_strided

__version__ = "0.1.0"


def __getattr__(name):
    # qkv.parallel (torch.distributed) loads on first use, keeping `import qkv` light.
    if name == "parallel":
        import importlib
        return importlib.import_module(".parallel", __name__)
    raise AttributeError(f"module 'qkv' has no attribute {name!r}")

__all__ = [
    "attention", "attention_weights", "explain_dispatch", "merge_partials", "masks", "scores", "Mask",
    "causal", "sliding_window", "key_padding", "document", "prefix_lm", "global_tokens",
    "block_sparse", "from_tensor", "from_function",
    "longformer", "bigbird", "dilated_window", "sparse_strided", "sparse_fixed",
]
