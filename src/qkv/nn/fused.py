"""Fused projections for inference: one matrix product where a module has several on one input.

A :class:`~qkv.nn.MultiHeadAttention` with separate ``q_proj``, ``k_proj``, ``v_proj`` multiplies
its input by three matrices, and :class:`~qkv.nn.SwiGLU` by two (``gate``, ``up``). For a decoding
step (one row per sequence) each product is a short, memory-bound call whose fixed cost is a good
part of its time, so one product with the matrices stacked, ``[W_q; W_k; W_v]``, is cheaper
(the same bytes read, one call instead of three) and gives the same numbers: every output element
is the same dot product.

The stacked copies are built from the modules' own weights on entering :func:`fused_projections`
and dropped on leaving it (``Decoder.generate`` decodes inside one), so they are never state:
``state_dict``, checkpoints and the modules' parameters are untouched, and a later change to the
weights is seen by the next block. Inside it, while grad mode is off, the modules multiply by the
copies; with grad mode on they run their own projections as always (gradients reach the
parameters). A module whose projections are not plain ``nn.Linear`` layers, or carry forward hooks,
is left alone (its own calls run, hooks included). The weights must not change inside the block.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn


class FusedLinear:
    """The weights of several ``nn.Linear`` layers on the same input stacked along the output:
    ``F.linear(x, weight, bias).split(widths, -1)`` is ``[layer(x) for layer in layers]``.

    ``weight (sum(out_features), in_features)``, ``bias`` (or None), ``widths`` the layers'
    ``out_features``. :meth:`refresh` copies the layers' current weights in place (the tensors keep
    their storage, so a compiled step or a CUDA graph that holds them stays valid)."""

    def __init__(self, layers: list[nn.Linear]):
        self.layers = list(layers)
        self.widths = [layer.out_features for layer in self.layers]
        with torch.no_grad():
            self.weight = torch.cat([layer.weight for layer in self.layers])
            has_bias = self.layers[0].bias is not None
            self.bias = torch.cat([layer.bias for layer in self.layers]) if has_bias else None

    @staticmethod
    def fits(layers: list) -> bool:
        """Plain ``nn.Linear`` layers (no subclass, no hooks) with one input width, dtype, device
        and bias setting: what stacking serves exactly."""
        first = layers[0]
        if type(first) is not nn.Linear:
            return False
        for layer in layers:
            if type(layer) is not nn.Linear or _has_hooks(layer) or layer.in_features != first.in_features \
                    or (layer.bias is None) != (first.bias is None) or layer.weight.dtype != first.weight.dtype \
                    or layer.weight.device != first.weight.device:
                return False
        return True

    def matches(self, layers: list) -> bool:
        """Whether this stack was built for ``layers`` (the same modules, shapes, dtype, device)."""
        return len(layers) == len(self.layers) and all(a is b for a, b in zip(layers, self.layers)) \
            and self.weight.dtype == layers[0].weight.dtype and self.weight.device == layers[0].weight.device \
            and self.widths == [layer.out_features for layer in layers]

    def refresh(self) -> None:
        """Copy the layers' current weights (and biases) into :attr:`weight` (:attr:`bias`)."""
        with torch.no_grad():
            torch.cat([layer.weight for layer in self.layers], out=self.weight)
            if self.bias is not None:
                torch.cat([layer.bias for layer in self.layers], out=self.bias)

    def tensors(self) -> list[Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as _module

    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def fusable_layers(module: nn.Module) -> list[nn.Linear] | None:
    """The projections of ``module`` that one stacked product can replace: ``q_proj, k_proj,
    v_proj`` of a :class:`~qkv.nn.MultiHeadAttention` with separate projections, ``gate, up`` of a
    :class:`~qkv.nn.SwiGLU`; None for any other module or one that does not fit."""
    from .attention import MultiHeadAttention
    from .mlp import SwiGLU

    if isinstance(module, MultiHeadAttention):
        if module.fused_qkv or module.kdim != module.embed_dim or module.vdim != module.embed_dim:
            return None
        layers = [module.q_proj, module.k_proj, module.v_proj]
    elif isinstance(module, SwiGLU):
        layers = [module.gate, module.up]
    else:
        return None
    return layers if FusedLinear.fits(layers) else None


def build(model: nn.Module) -> dict[nn.Module, FusedLinear]:
    """A :class:`FusedLinear` for every module of ``model`` that :func:`fusable_layers` serves."""
    out = {}
    for module in model.modules():
        layers = fusable_layers(module)
        if layers is not None:
            out[module] = FusedLinear(layers)
    return out


@contextlib.contextmanager
def fused_projections(model: nn.Module, fused: dict[nn.Module, FusedLinear] | None = None):
    """Within the block, the attention and SwiGLU modules of ``model`` multiply by stacked copies
    of their projections while grad mode is off (see the module docstring)::

        with torch.no_grad(), fused_projections(model):
            logits = model(ids, cache)          # one product for q, k, v and one for gate, up per layer

    ``fused``: stacks to install instead of building new ones (a compiled decode step keeps its
    own, refreshed in place, so that its graph holds the same tensors on every call); a module
    whose stack no longer :meth:`~FusedLinear.matches` it is left alone. Nested blocks keep the
    outer block's stacks. With a global forward hook registered nothing is fused."""
    if fused is None:
        fused = {} if _global_hooks() else build(model)
    installed = []
    try:
        for module, stack in fused.items():
            if module.__dict__.get("_fused") is None:
                layers = fusable_layers(module)
                if layers is not None and stack.matches(layers):
                    module._fused = stack
                    installed.append(module)
        yield
    finally:
        for module in installed:
            module._fused = None
