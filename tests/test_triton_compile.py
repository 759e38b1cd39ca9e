"""Every triton-backend kernel variant compiles for sm_90 (H100/H200) without a GPU, with
Triton's own ptxas: the interpreter checks what the kernels compute, not that they compile.
About 8 minutes on 2 cores, so it runs only with QKV_SLOW=1 (and on any machine with triton); so does
the GPU benchmark script's interpreter smoke run."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("QKV_SLOW") != "1", reason="slow (~8 min): set QKV_SLOW=1")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (qkv[triton])")
def test_every_kernel_variant_compiles_for_sm90():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_compile_check.py")], env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0 and "all compiled" in result.stdout, result.stdout[-5000:] + result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("QKV_SLOW") != "1", reason="slow (~2.5 min): set QKV_SLOW=1")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (qkv[triton])")
def test_gpu_benchmark_script_runs_end_to_end_in_the_interpreter(tmp_path):
    """benchmarks/gpu_attention.py --smoke: every row, contender and JSON field at tiny sizes on
    the CPU (the script itself, not its figures)."""
    import json

    out = tmp_path / "gpu_attention.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_attention.py"), "--smoke", "--out",
                             str(out)], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {"environment", "targets", "decode", "training", "check_error_ratio"} <= set(data)
    assert {"torch", "triton", "device", "date"} <= set(data["environment"])
    decode = data["decode"][0]
    assert not decode["errors"] and {"triton paged kernel", "gather + sdpa", "triton paged window kernel"} <= \
        set(decode["ms"])
    assert all(err < 0.05 for err in decode["max_err"].values()), decode["max_err"]
    assert {row["mask"] for row in data["training"]} == {"full", "causal", "window", "documents", "prefix"}
