"""The tokenizer wrapper: padding and truncation are ours to choose, and bad calls say what was expected."""

import pytest
import torch

from qkv.models import BertModel, BertTokenizer, default_model_path

from .fixtures.tiny_bert import save_tiny


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizer.from_file(default_model_path() / "tokenizer.json", pad_id=0, max_length=512)


def test_the_files_own_padding_and_truncation_are_switched_off(tokenizer):
    """all-MiniLM-L6-v2's tokenizer.json pads to 128 and cuts at 128; we pad to the longest text."""
    assert tokenizer.tokenizer.padding is None and tokenizer.tokenizer.truncation is None
    batch = tokenizer(["The cat sat on the mat", "word " * 200])
    assert batch.input_ids.shape == (2, 202)
    assert batch.lengths.tolist() == [8, 202]
    assert batch.input_ids[0, 8:].eq(0).all() and batch.attention_mask[0, 8:].eq(0).all()
    assert len(batch.tokens[0]) == len(batch.offsets[0]) == 8


def test_truncation_only_when_asked(tokenizer):
    cut = tokenizer("word " * 200, truncation=True, max_length=16)
    assert cut.input_ids.shape == (1, 16) and cut.tokens[0][-1] == "[SEP]"
    assert tokenizer.tokenizer.truncation is None  # not left switched on for the next call
    with pytest.raises(ValueError, match=r"texts\[0\] is 202 tokens long, more than max_length=16"):
        tokenizer("word " * 200, max_length=16)


def test_sentence_pairs_get_segment_ids(tokenizer):
    batch = tokenizer(["Who sat?", "Where?"], ["The cat.", "On the mat."])
    types = batch.token_type_ids[0, : int(batch.lengths[0])].tolist()
    assert types == [0] * 5 + [1] * 4  # [CLS] who sat ? [SEP] | the cat . [SEP]
    assert batch.tokens[0][4] == "[SEP]"


@pytest.mark.parametrize("args,kwargs,error,words", [
    ((["a"], ["b", "c"]), {}, ValueError, r"pairs must have one entry per text \(1\), got 2"),
    (([],), {}, ValueError, "texts must not be empty"),
    ((["a", 3],), {}, TypeError, "texts must be a str or a list of str"),
    (("a",), {"max_length": 513}, ValueError, r"max_length must be an integer in \[1, 512\]"),
    (("a",), {"max_length": 0}, ValueError, r"max_length must be an integer in \[1, 512\]"),
])
def test_bad_calls(tokenizer, args, kwargs, error, words):
    with pytest.raises(error, match=words):
        tokenizer(*args, **kwargs)


def test_unreadable_tokenizer_file_names_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: cannot be read by the tokenizers package"):
        BertTokenizer.from_file(tmp_path / "tokenizer.json", pad_id=0, max_length=8)
    with pytest.raises(FileNotFoundError, match=r"nothing\.json: tokenizer file"):
        BertTokenizer.from_file(tmp_path / "nothing.json", pad_id=0, max_length=8)


def test_checkpoint_without_tokenizer_runs_on_ids(tmp_path):
    directory = save_tiny(tmp_path / "tiny")
    model = BertModel.from_pretrained(directory)
    assert model.tokenizer is None
    assert model(torch.tensor([[2, 5, 7]])).last_hidden_state.shape == (1, 3, 32)
    with pytest.raises(RuntimeError, match="no tokenizer.json"):
        model.tokenize("hello")

