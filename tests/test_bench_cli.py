"""``qkv bench``: each timing's spread over its interleaved runs, ``auto`` timed on its own (dispatch
included), and ratios that never print as ``0.0x``."""

import pytest

from qkv import bench
from qkv.cli import main as cli


def test_ratios_keep_their_digits():
    assert [bench.format_ratio(x) for x in (0.0123, 0.068, 0.7, 1.0, 5.97, 16.42, 123.4)] == \
        ["0.012x", "0.068x", "0.70x", "1.00x", "5.97x", "16.4x", "123.4x"]


def test_rows_keep_every_run_and_time_auto_on_its_own():
    row = bench.run_problem(64, "window", heads=2, head_dim=16, window=16, repeat=3, peers=(),
                            backends=["tiled", "sdpa"])
    for name in ("tiled", "sdpa", "auto"):
        low, mid, high = row.spread(name)
        assert len(row.samples[name]) == 3 and len(row.cpu_samples[name]) == 3
        assert low <= mid <= high and mid == row.times[name]
    assert row.auto_choice in ("tiled", "sdpa") and row.samples["auto"] is not row.samples[row.auto_choice]
    assert len(row.load) == 2
    table = bench.format_spread([row], ["tiled", "sdpa"])
    assert table.splitlines()[2].startswith("| 64 | window | ") and table.count(" / ") == 4


def test_interleaved_rounds_rotate_the_order():
    order = []
    wall, cpu = bench.interleaved({n: (lambda n=n: order.append(n)) for n in "abc"}, 3)
    assert order == list("abc") + list("abc") + list("bca") + list("cab")  # warm-up, then rotated rounds
    assert all(len(wall[n]) == len(cpu[n]) == 3 for n in "abc")


def test_the_command_prints_both_tables(capsys):
    assert cli(["bench", "--seq", "64", "--masks", "causal", "--heads", "2", "--head-dim", "16", "--repeat", "2",
                "--backends", "tiled", "sdpa"]) == 0
    printed = capsys.readouterr().out
    assert "| N | mask | tiled | sdpa |" in printed
    assert "| auto picks | auto/best | picked/best | sdpa/tiled |" in printed
    assert "min / median / max" in printed and "0.0x" not in printed


@pytest.mark.parametrize("argv,fragment", [(["--repeat", "0"], "--repeat must be a positive number"),
                                           (["--backends", "nope"], "argument --backends: invalid choice")])
def test_bad_options(capsys, argv, fragment):
    assert cli(["bench", *argv]) == 2
    assert fragment in capsys.readouterr().err


def test_an_unwritable_json_path_is_refused_before_anything_is_timed(capsys, tmp_path, monkeypatch):
    """``--json`` under a file (or naming a directory) fails at once, naming the option, rather
    than after the whole benchmark has run; a missing directory is made."""
    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark ran before --json was checked")
    monkeypatch.setattr(bench, "run_problem", refuse)
    (tmp_path / "file").write_text("x")
    for path, fragment in [(tmp_path / "file" / "out.json", "--json: cannot make the directory"),
                           (tmp_path, "--json: " + str(tmp_path) + " is a directory")]:
        assert cli(["bench", "--seq", "64", "--json", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err, err
    for argv in (["--plot", str(tmp_path / "file" / "p.png")], ["--heads", "0"]):
        assert cli(["bench", "--scaling", "--scaling-seq", "64", *argv]) == 2
        assert "Traceback" not in capsys.readouterr().err
    monkeypatch.undo()
    out = tmp_path / "new" / "dir" / "bench.json"
    assert cli(["bench", "--seq", "32", "--masks", "full", "--heads", "1", "--head-dim", "8", "--repeat", "1",
                "--backends", "tiled", "--json", str(out)]) == 0
    assert out.is_file()
