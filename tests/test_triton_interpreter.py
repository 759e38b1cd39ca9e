"""Runs ``tests/test_triton.py`` under Triton's CPU interpreter as part of the default suite.

``TRITON_INTERPRET=1`` must be set before Python starts (Triton reads it at import), so the
kernels' tests run in a child pytest process, started when the suite's tests are collected
(``tests/background.py``); its summary is shown when it fails. On a CUDA
machine test_triton.py runs natively at full size instead, and this test skips.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import background

ROOT = Path(__file__).resolve().parent.parent


INTERPRETER = background.child("triton interpreter", ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                                      "--no-header", "tests/test_triton.py", "tests/test_triton_decode.py"],
                               env={"TRITON_INTERPRET": "1", "PYTHONPATH": background.python_path()})


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (qkv[triton])")
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: tests/test_triton.py runs on the GPU")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already in the interpreter")
@pytest.mark.background_child("triton interpreter")
def test_triton_kernels_under_the_interpreter():
    """The child pytest started at collection (tests/background.py: it runs alongside the suite)."""
    result = INTERPRETER.result(timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


def test_import_qkv_does_not_import_triton():
    code = "import sys, qkv; qkv.explain_dispatch; assert 'triton' not in sys.modules, 'triton imported'"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_triton_says_why_it_cannot_run_on_cpu():
    if os.environ.get("TRITON_INTERPRET") == "1" or importlib.util.find_spec("triton") is None:
        pytest.skip("the interpreter (or no triton) changes the reason")
    import qkv

    q = torch.randn(1, 1, 4, 8)
    decision = qkv.explain_dispatch(q, q, q)
    assert decision.chosen != "triton"
    assert "Triton kernels run on CUDA devices" in " ".join(decision.reasons["triton"])


def test_cuda_estimate_sends_masked_problems_to_triton_and_dense_ones_to_sdpa(monkeypatch):
    """The guessed CUDA cost model ranks as intended (evaluated on CPU problems with CUDA rates)."""
    import qkv
    from qkv.backends import REGISTRY, costs
    from qkv.backends.triton import cuda_estimate
    from qkv.problem import make_problem

    monkeypatch.setattr(costs, "rates", lambda problem: costs.RATES["cuda"])
    sdpa = REGISTRY["sdpa"].estimate
    q = torch.empty(1, 16, 8192, 128, device="meta", dtype=torch.bfloat16)
    for mask, triton_wins in ((None, False), (qkv.causal(), False), (qkv.sliding_window(1024), True),
                              (qkv.document(torch.arange(8192) * 8 // 8192), True)):
        p = make_problem(q, q, q, mask)
        assert (cuda_estimate(p) < sdpa(p)) == triton_wins, mask
    kv = torch.empty(1, 8, 32768, 128, device="meta", dtype=torch.bfloat16)
    decode = make_problem(torch.empty(1, 32, 1, 128, device="meta", dtype=torch.bfloat16), kv, kv)
    assert cuda_estimate(decode) > sdpa(decode)  # decode stays on SDPA until measured


def test_deterministic_switch():
    """The backward's mode (configs.set_deterministic): deterministic unless switched off, and
    torch's deterministic mode keeps it deterministic. No Triton import needed."""
    from qkv.backends.triton import configs

    assert configs.deterministic()
    configs.set_deterministic(False)
    try:
        assert not configs.deterministic()
        torch.use_deterministic_algorithms(True)
        try:
            assert configs.deterministic()
        finally:
            torch.use_deterministic_algorithms(False)
        with pytest.raises(TypeError, match="bool"):
            configs.set_deterministic("no")
    finally:
        configs.set_deterministic(True)
