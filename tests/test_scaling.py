"""The scaling benchmark's arithmetic (slopes, crossovers), one in-process sweep, and the CLI's
argument errors; the measured results themselves live in benchmarks/results/scaling_cpu.json."""

import math

import pytest
import torch

from qkv import scaling
from qkv.cli import main
from qkv.commands import bench_scaling


def test_fit_slope_recovers_power_laws():
    ns = [1024, 2048, 4096, 8192, 16384]
    assert scaling.fit_slope(ns, [3e-9 * n ** 2 for n in ns]) == pytest.approx(2.0)
    assert scaling.fit_slope(ns, [5e-6 * n + 1e-9 * n * math.log(n) for n in ns]) == pytest.approx(1.0, abs=0.1)
    assert scaling.fit_slope([1024], [1.0]) is None


def test_crossover_interpolates_and_extrapolates():
    ns = [1024, 2048, 4096, 8192]
    dense = {n: 1e-8 * n ** 2 for n in ns}
    linear = {n: 1e-4 * n for n in ns}  # equal at N = 10^4
    measured = scaling.crossover(dense, {n: 1e-5 * n for n in ns})  # equal at N = 1000: before the range
    assert measured["n"] == 1024 and "shortest" in measured["note"]
    inside = scaling.crossover(dense, {n: 4e-5 * n for n in ns})  # equal at N = 4000
    assert not inside["extrapolated"] and inside["n"] == pytest.approx(4000, rel=0.01)
    ahead = scaling.crossover(dense, linear, extrapolate_to=100_000)
    assert ahead["extrapolated"] and ahead["n"] == pytest.approx(10_000, rel=0.01)
    assert scaling.crossover(dense, linear, extrapolate_to=5_000) is None
    cheap = {n: 1e-6 * n for n in ns}
    assert scaling.crossover(cheap, dense, extrapolate_to=10 ** 9) is None  # dense never catches up
    # lines that barely converge meet far beyond any length (a CI run's timings: exp() overflowed)
    a = {64: 0.000898264999989351, 128: 0.0010417850000123963}
    b = {64: 0.005560771999995495, 128: 0.005720651000018506, 256: 0.007469224000004715}
    assert scaling.crossover(a, b, extrapolate_to=4096) is None


def test_a_sweep_measures_time_and_memory_and_summarises():
    rows = []
    for method in ("dense", "linear", "window"):
        rows += list(scaling.sweep(method, [64, 128, 256], batch=1, heads=1, head_dim=8, dtype=torch.float32,
                                   device="cpu", repeat=1, max_seconds=10, max_dense_bytes=3 * 128 * 128 * 4,
                                   min_total_s=0.0))
    dense = [r for r in rows if r["method"] == "dense"]
    assert [r["n"] for r in dense] == [64, 128, 256] and "skipped" in dense[2]  # over the memory cap
    ran = [r for r in rows if "seconds" in r]
    assert all(r["seconds"] > 0 and r["cpu_seconds"] >= 0 and r["runs"] >= 1 for r in ran)
    summary = bench_scaling.summarise(rows, ["dense", "linear", "window"], [64, 128, 256])
    assert summary["clock"] == "cpu_seconds" and set(summary["slopes"]) == {"dense", "linear", "window"}
    text = bench_scaling.format_tables(rows, ["dense", "linear", "window"], [64, 128, 256], summary)
    assert "| 256 | — |" in text and "linear vs dense" in text


@pytest.mark.parametrize("argv, message", [
    (["bench", "--scaling", "--methods", "flash"], "unknown --methods flash"),
    (["bench", "--scaling", "--scaling-seq", "0"], "positive lengths"),
])
def test_bad_scaling_arguments_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
