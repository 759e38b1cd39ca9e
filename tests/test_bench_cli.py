"""``qkv bench``: each timing's spread over its runs, ``auto`` timed as the backend it picked, and
ratios that never print as ``0.0x``."""

import pytest

from qkv import bench
from qkv.cli import main as cli


def test_ratios_keep_their_digits():
    assert [bench.format_ratio(x) for x in (0.0123, 0.068, 0.7, 1.0, 5.97, 16.42, 123.4)] == \
        ["0.012x", "0.068x", "0.70x", "1.00x", "5.97x", "16.4x", "123.4x"]


def test_rows_keep_every_run_and_auto_is_the_picked_backend():
    row = bench.run_problem(64, "window", heads=2, head_dim=16, window=16, repeat=3, peers=(),
                            backends=["tiled", "sdpa"])
    for name in ("tiled", "sdpa", "auto"):
        low, mid, high = row.spread(name)
        assert len(row.samples[name]) == 3 and low <= mid <= high and low == row.times[name]
    assert row.times["auto"] == row.times[row.auto_choice] and row.samples["auto"] == row.samples[row.auto_choice]
    table = bench.format_spread([row], ["tiled", "sdpa"])
    assert table.splitlines()[2].startswith("| 64 | window | ") and table.count(" / ") == 4


def test_the_command_prints_both_tables(capsys):
    assert cli(["bench", "--seq", "64", "--masks", "causal", "--heads", "2", "--head-dim", "16", "--repeat", "2",
                "--backends", "tiled", "sdpa"]) == 0
    printed = capsys.readouterr().out
    assert "| N | mask | tiled | sdpa |" in printed and "| auto picks | picked/best | sdpa/tiled |" in printed
    assert "min / median / max" in printed and "0.0x" not in printed


@pytest.mark.parametrize("argv,fragment", [(["--repeat", "0"], "--repeat must be a positive number"),
                                           (["--backends", "nope"], "argument --backends: invalid choice")])
def test_bad_options(capsys, argv, fragment):
    assert cli(["bench", *argv]) == 2
    assert fragment in capsys.readouterr().err
