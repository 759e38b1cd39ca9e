"""GPU benchmark of qkv's Triton kernels against SDPA (flash / cuDNN / efficient) and compiled
FlexAttention, training shapes and decode; writes gpu_attention.json (device, versions, date).

    PYTHONPATH=src python benchmarks/gpu_attention.py                 # the full grid (~8 min budget)
    PYTHONPATH=src python benchmarks/gpu_attention.py --seq 4096 16384 --head-dims 128 --budget-s 240
    QKV_TRITON_AUTOTUNE=0 ...                                          # default tile configs, no autotuning

Also ``qkv bench --gpu-suite`` (same arguments). See src/qkv/backends/triton/benchmark.py.
"""

import argparse

from qkv.backends.triton import benchmark

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchmark.add_arguments(parser)
    raise SystemExit(benchmark.main(parser.parse_args()))
