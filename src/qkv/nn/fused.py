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
weights is seen by the next block. Inside it, while grad mode is off and an input has at most
:data:`MAX_ROWS` rows (batch x tokens: a decoding step), the modules multiply by the copies;
otherwise they run their own projections as always (with grad mode on, gradients reach the
parameters). A module whose projections are not plain ``nn.Linear`` layers, or carry forward hooks,
is left alone (its own calls run, hooks included). The weights must not change inside the block.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor, nn


#: Rows (batch x tokens) up to which the stacked product runs: a decoding step's few rows make
#: short, call-bound products, and one beats several (on a 2-core AMD EPYC with MKL, 1 thread, one
#: row: q/k/v 1.35x, gate/up 1.1x; 8 rows: 1.08x, 1.01x). A prefill's many rows are compute-bound:
#: there the separate products run as fast or faster (32 rows: 1.02x, 0.96x; 256: 0.98x, 0.99x).
MAX_ROWS = 16


class FusedLinear:
    """The weights of several ``nn.Linear`` layers on the same input stacked along the output:
    ``F.linear(x, weight, bias).split(widths, -1)`` is ``[layer(x) for layer in layers]``.

    ``weight (sum(out_features), in_features)``, ``bias`` (or None), ``widths`` the layers'
    ``out_features``. With ``transposed`` the weight is kept as ``(in_features, sum(out_features))``
    in memory and ``weight`` is its transposed view, so that a product with it runs as
    ``x @ W^T`` on a contiguous ``W^T`` (a compiled CPU step's choice: see
    :class:`~qkv.nn.compiled.DecodeStep`). :meth:`refresh` copies the layers' current weights in
    place (the tensors keep their storage, so a compiled step or a CUDA graph that holds them stays
    valid)."""

    def __init__(self, layers: list[nn.Linear], *, transposed: bool = False):
        self.layers = list(layers)
        self.widths = [layer.out_features for layer in self.layers]
        self.transposed = bool(transposed)
        #: one layer, not transposed: the layer's own tensors (no copy), for a direct call
        self.is_reference = len(self.layers) == 1 and not self.transposed
        if self.is_reference:
            self.weight, self.bias = self.layers[0].weight, self.layers[0].bias
            return
        with torch.no_grad():
            weight = torch.cat([layer.weight for layer in self.layers])
            self.weight = weight.t().contiguous().t() if self.transposed else weight
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
        if self.is_reference:
            self.weight, self.bias = self.layers[0].weight, self.layers[0].bias
            return
        with torch.no_grad():
            if self.transposed:
                self.weight.copy_(torch.cat([layer.weight for layer in self.layers]))
            else:
                torch.cat([layer.weight for layer in self.layers], out=self.weight)
            if self.bias is not None:
                torch.cat([layer.bias for layer in self.layers], out=self.bias)

    def tensors(self) -> list[Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]


class Stacks:
    """What one module runs directly inside :func:`fused_projections`: ``proj``, the stacked
    projections of its input (``q_proj, k_proj, v_proj`` of an attention, ``gate, up`` of a
    SwiGLU); ``out``, its output projection (``out_proj``, ``down``, a decoder's ``lm_head``: the
    layer's own weight, or a transposed copy); ``norms``, its norms as direct calls of
    ``torch.rms_norm`` / ``torch.layer_norm`` with their own weights (a block's ``attn_norm`` and
    ``mlp_norm``, a decoder's final ``norm``). Direct calls skip ``nn.Module.__call__``, which
    costs as much as a small operation; every module they stand for is plain and has no hooks."""

    __slots__ = ("proj", "out", "norms")

    def __init__(self, proj: FusedLinear | None = None, out: FusedLinear | None = None, norms: tuple | None = None):
        self.proj, self.out, self.norms = proj, out, norms

    def linears(self) -> list[FusedLinear]:
        return [stack for stack in (self.proj, self.out) if stack is not None]


def serves(stack: FusedLinear | None, x: Tensor) -> bool:
    """Whether a module should multiply ``x (B, N, E)`` by ``stack`` (one of its installed stacks,
    or None): grad mode off, and for a stacked or transposed copy at most :data:`MAX_ROWS` rows."""
    return stack is not None and not torch.is_grad_enabled() and \
        (stack.is_reference or x.shape[0] * x.shape[1] <= MAX_ROWS)


def norms_serve(stacks: Stacks | None) -> tuple | None:
    """A module's direct norm calls, if installed and grad mode is off; else None."""
    return None if stacks is None or stacks.norms is None or torch.is_grad_enabled() else stacks.norms


def direct_norm(norm: nn.Module):
    """``norm`` as a direct call of the function its ``forward`` calls (exactly that call, with
    its own weight), or None if it is not a plain ``nn.RMSNorm`` / ``nn.LayerNorm`` without hooks."""
    if _has_hooks(norm):
        return None
    if type(norm) is nn.RMSNorm:
        return functools.partial(torch.rms_norm, normalized_shape=norm.normalized_shape, weight=norm.weight,
                                 eps=norm.eps)
    if type(norm) is nn.LayerNorm:
        return functools.partial(torch.layer_norm, normalized_shape=norm.normalized_shape, weight=norm.weight,
                                 bias=norm.bias, eps=norm.eps)
    return None


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as _module

    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def _layers(module: nn.Module) -> tuple[list | None, nn.Linear | None, list | None]:
    """``(input projections, output projection, norms)`` of a module :func:`fused_projections`
    serves (each None where it has none)."""
    from .attention import MultiHeadAttention
    from .block import TransformerBlock
    from .mlp import SwiGLU
    from .transformer import Decoder

    if isinstance(module, MultiHeadAttention):
        same_input = not module.fused_qkv and module.kdim == module.embed_dim == module.vdim
        return ([module.q_proj, module.k_proj, module.v_proj] if same_input else None), module.out_proj, None
    if isinstance(module, SwiGLU):
        return [module.gate, module.up], module.down, None
    if isinstance(module, TransformerBlock):
        return None, None, [module.attn_norm, module.mlp_norm]
    if isinstance(module, Decoder):
        return None, module.lm_head, [module.norm]
    return None, None, None


def _stacks_for(module: nn.Module, transposed: bool) -> Stacks | None:
    proj_layers, out_layer, norm_modules = _layers(module)
    proj = FusedLinear(proj_layers, transposed=transposed) \
        if proj_layers is not None and FusedLinear.fits(proj_layers) else None
    out = FusedLinear([out_layer], transposed=transposed) \
        if out_layer is not None and FusedLinear.fits([out_layer]) else None
    norms = None
    if norm_modules is not None:
        norms = tuple(direct_norm(norm) for norm in norm_modules)
        norms = None if None in norms else norms
    return None if proj is None and out is None and norms is None else Stacks(proj, out, norms)


def _still_fits(module: nn.Module, stacks: Stacks) -> bool:
    proj_layers, out_layer, norm_modules = _layers(module)
    if stacks.proj is not None and (proj_layers is None or not FusedLinear.fits(proj_layers)
                                    or not stacks.proj.matches(proj_layers)):
        return False
    if stacks.out is not None and (out_layer is None or not FusedLinear.fits([out_layer])
                                   or not stacks.out.matches([out_layer])):
        return False
    if stacks.norms is not None:
        if norm_modules is None or len(norm_modules) != len(stacks.norms):
            return False
        for norm, call in zip(norm_modules, stacks.norms):
            if _has_hooks(norm) or call.keywords.get("weight") is not getattr(norm, "weight", None):
                return False
    return True


def build(model: nn.Module, *, transposed: bool = False) -> dict[nn.Module, Stacks]:
    """:class:`Stacks` for every module of ``model`` that has projections to stack (attention with
    separate q/k/v projections, SwiGLU), and with ``transposed`` transposed copies of every
    output projection too (attention, SwiGLU, the decoder's LM head)."""
    out = {}
    for module in model.modules():
        stacks = _stacks_for(module, transposed)
        if stacks is not None:
            out[module] = stacks
    return out


@contextlib.contextmanager
def fused_projections(model: nn.Module, fused: dict[nn.Module, Stacks] | None = None):
    """Within the block, the attention and SwiGLU modules of ``model`` multiply by stacked copies
    of their projections while grad mode is off (see the module docstring)::

        with torch.no_grad(), fused_projections(model):
            logits = model(ids, cache)          # one product for q, k, v and one for gate, up per layer

    ``fused``: stacks to install instead of building new ones (a compiled decode step keeps its
    own, refreshed in place, so that its graph holds the same tensors on every call); a module
    whose stacks no longer fit it is left alone. Nested blocks keep the outer block's stacks. With
    a global forward hook registered nothing is fused."""
    if fused is None:
        fused = {} if _global_hooks() else build(model)
    installed = []
    try:
        for module, stacks in fused.items():
            if module.__dict__.get("_fused") is None and _still_fits(module, stacks):
                module._fused = stacks
                installed.append(module)
        yield
    finally:
        for module in installed:
            module._fused = None
