"""A fix, for qkv's own compiles, of a naming bug in torch's C++ FlexAttention template (CPU).

The template compiles a ``score_mod``/``mask_mod`` as a loop over a tile whose sizes are only known
at run time. It gives those two sizes placeholder symbols, lets inductor name them like any size
(``ks<n>``, numbered in order of first use), then turns the names into the runtime variables
``cur_qSplitSize`` and ``cur_kvSplitSize`` with a plain text replacement. Sizes of the tensors
the modifier captures are named ``ks<symbol number>`` too, so when the tile size is ``ks1`` and a
captured size ``ks15``, the replacement makes ``cur_qSplitSize5`` of the latter, and the C++ does
not compile (torch 2.11 to 2.14 at least, whose template reads the same). Whether it happens
depends on how many symbols the process's shape environment handed out before, so ALiBi, a
relative bias or a function of ``q - k`` compiled in one run and not in another.

:func:`fixed_cpu_template` is a context in which the tile's two sizes are given their runtime names
directly, so nothing needs replacing (torch's replacement then changes a name into itself). It is
entered around qkv's compiled CPU Flex calls only; torch is left as it was outside them. If
torch's template no longer has the parts this relies on, the context does nothing.
"""

from __future__ import annotations

import contextlib
import functools

#: The template's names for the tile's rows and columns, in the order of its ``block_vars``.
RUNTIME_NAMES = ("cur_qSplitSize", "cur_kvSplitSize")


@functools.cache
def _template_parts():
    """``(CppFlexAttentionTemplate, the codegen.cpp module)``, or None if torch lacks them (looked up
    once: it imports inductor)."""
    try:
        import torch._inductor.compile_fx  # noqa: F401 - first, or the template's import is circular
        from torch._inductor.codegen import cpp
        from torch._inductor.codegen.cpp_flex_attention_template import CppFlexAttentionTemplate
    except ImportError:  # pragma: no cover - torch without the CPU template
        return None
    if not (hasattr(CppFlexAttentionTemplate, "modification") and hasattr(cpp, "KernelGroup")):
        return None  # pragma: no cover - a torch whose template works differently
    return CppFlexAttentionTemplate, cpp


def _naming_tile_sizes(kernel_group_class, block_vars):
    """A ``KernelGroup`` class whose kernels name the tile-size symbols ``block_vars`` by their
    runtime variables (every other size as before)."""
    names = dict(zip(block_vars, RUNTIME_NAMES))

    class TileNamingKernelGroup(kernel_group_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            kernel_args, default = self.args, self.args.size

            def size(symbol):
                name = names.get(symbol)
                if name is None:
                    return default(symbol)
                kernel_args.sizevars[symbol] = name
                return name

            kernel_args.size = size

    return TileNamingKernelGroup


def _fixed_modification(original, cpp):
    def modification(self, subgraph_buffer, output_name, output_idx):
        block_vars = getattr(self, "block_vars", None)
        if not block_vars or len(block_vars) != len(RUNTIME_NAMES):
            return original(self, subgraph_buffer, output_name, output_idx)
        plain = cpp.KernelGroup
        cpp.KernelGroup = _naming_tile_sizes(plain, block_vars)
        try:
            return original(self, subgraph_buffer, output_name, output_idx)
        finally:
            cpp.KernelGroup = plain

    modification.qkv_fix = True
    return modification


@contextlib.contextmanager
def fixed_cpu_template():
    """Within this context, torch's CPU Flex template names its tile sizes correctly (see the
    module's docstring). Re-entrant; costs two attribute writes."""
    parts = _template_parts()
    if parts is None:
        yield
        return
    template, cpp = parts
    original = template.modification
    if getattr(original, "qkv_fix", False):  # entered already (a nested call)
        yield
        return
    template.modification = _fixed_modification(original, cpp)
    try:
        yield
    finally:
        template.modification = original


__all__ = ["fixed_cpu_template", "RUNTIME_NAMES"]
