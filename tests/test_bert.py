"""all-MiniLM-L6-v2 on qkv attention equals Hugging Face ``transformers`` (hidden states and every
layer's attention weights) and ``sentence-transformers`` (sentence embeddings)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

import qkv.backends  # noqa: E402
from qkv.models import BertModel, compare_word_in_contexts, default_model_path, word_vectors  # noqa: E402

transformers.logging.set_verbosity_error()

TEXTS = [
    "The cat sat on the mat",
    "Attention is all you need.",
    "I deposited cash at the bank, then sat on the river bank and watched the boats go by.",
    "hi",
]


@pytest.fixture(scope="module")
def model():
    return BertModel.from_pretrained()


@pytest.fixture(scope="module")
def hf_model():
    return transformers.BertModel.from_pretrained(str(default_model_path()), attn_implementation="eager").eval()


def run_both(ours, ref, batch):
    with torch.no_grad():
        got = ours(**batch, output_attentions=True, output_hidden_states=True)
        want = ref(**batch, output_attentions=True, output_hidden_states=True)
    return got, want


def test_tokenizer_matches_sentence_transformers(model):
    st = SentenceTransformer(str(default_model_path()), device="cpu")
    want = getattr(st, "preprocess", st.tokenize)(TEXTS)  # tokenize() before sentence-transformers 6
    got = model.tokenize(TEXTS)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert getattr(got, key).tolist() == want[key].tolist()
    one = model.tokenize("The cat sat on the mat")
    assert one.input_ids[0].tolist() == [101, 1996, 4937, 2938, 2006, 1996, 13523, 102]
    assert one.tokens[0] == ["[CLS]", "the", "cat", "sat", "on", "the", "mat", "[SEP]"]


@pytest.mark.parametrize("backend", [None, "reference", "tiled"])
def test_minilm_equals_transformers_with_padding(model, hf_model, backend):
    """float32, a padded batch: every layer's output on real tokens and every attention map to 1e-5."""
    batch = model.tokenize(TEXTS)
    assert not bool(batch.attention_mask.all())  # the batch is padded
    model.backend = backend
    try:
        got, want = run_both(model, hf_model, batch.model_inputs())
    finally:
        model.backend = None
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got.last_hidden_state[real], want.last_hidden_state[real], atol=1e-5, rtol=0)
    assert len(got.hidden_states) == len(want.hidden_states) == 7
    for g, w in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(g[real], w[real], atol=1e-5, rtol=0)
    assert len(got.attentions) == 6 and got.attentions[0].shape == (4, 12, real.shape[1], real.shape[1])
    for g, w in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
        assert torch.all(g.masked_select(~real[:, None, None, :]) == 0)  # nothing attends to padding


def test_minilm_equals_transformers_in_float64_at_every_position(hf_model):
    """Padding rows too: in float64 both compute the same function, to rounding. (In float32 the
    padding rows of either model are ~1.5e-5 from float64: those rows are badly conditioned.)"""
    ours = BertModel.from_pretrained(dtype=torch.float64)
    ref = transformers.BertModel.from_pretrained(str(default_model_path()), attn_implementation="eager",
                                                 dtype=torch.float64).eval()
    batch = ours.tokenize(TEXTS)
    got, want = run_both(ours, ref, batch.model_inputs())
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-10, rtol=0)
    for g, w in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def test_left_padding_and_token_types_equal_transformers(model, hf_model):
    """A mask that is not a prefix (left padding) goes through a tensor mask; segment ids count."""
    batch = model.tokenize(["A question about attention?", "Short"], ["An answer about masks.", "pair"])
    n = batch.input_ids.shape[1]
    lengths = batch.lengths.tolist()
    left = {k: torch.stack([torch.cat([v[b, lengths[b]:], v[b, :lengths[b]]]) for b in range(2)])
            for k, v in batch.model_inputs().items()}
    assert left["attention_mask"][1, 0] == 0 and left["token_type_ids"].max() == 1 and n > lengths[1]
    got, want = run_both(model, hf_model, left)
    real = left["attention_mask"].bool()
    torch.testing.assert_close(got.last_hidden_state[real], want.last_hidden_state[real], atol=1e-5, rtol=0)
    for g, w in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_text_without_real_tokens_gives_zero_attention_not_nan(model):
    ids = torch.tensor([[101, 7592, 102], [0, 0, 0]])
    with torch.no_grad():
        out = model(ids, torch.tensor([[1, 1, 1], [0, 0, 0]]), output_attentions=True)
    assert torch.isfinite(out.last_hidden_state).all()
    assert all(bool(a[1].eq(0).all()) and bool(a[0].sum(-1).sub(1).abs().max() < 1e-5) for a in out.attentions)


def test_sentence_embeddings_equal_sentence_transformers(model):
    """Mean pooling + normalisation (modules.json, 1_Pooling/config.json), texts cut at 256 tokens."""
    st = SentenceTransformer(str(default_model_path()), device="cpu")
    texts = TEXTS + ["word " * 300]  # longer than the checkpoint's max_seq_length of 256
    want = st.encode(texts, convert_to_tensor=True, batch_size=3)
    got = model.encode(texts, batch_size=2)
    assert got.shape == (5, 384)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(5), atol=1e-6, rtol=0)
    raw = model.encode(texts[:1], normalize=False)
    torch.testing.assert_close(raw / raw.norm(dim=-1, keepdim=True), got[:1], atol=1e-6, rtol=0)


def test_512_tokens_through_the_tiled_backend(model, hf_model, monkeypatch):
    """The longest input the positions allow, padded in a batch: backend='tiled' (O(N) memory)
    gives the outputs of transformers and of the default backend."""
    calls = []
    tiled = qkv.backends.REGISTRY["tiled"]
    original_run = tiled.run
    monkeypatch.setattr(tiled, "run", lambda problem: calls.append(problem.nk) or original_run(problem))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (2, 512), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 300:] = 0
    ids[:, 0], ids[0, -1], ids[1, 299] = 101, 102, 102
    with torch.no_grad():
        model.backend = "tiled"
        try:
            got = model(ids, mask).last_hidden_state
        finally:
            model.backend = None
        default = model(ids, mask).last_hidden_state
        want = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert calls == [512] * 6  # every layer ran on the tiled backend
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[real], default[real], atol=1e-5, rtol=0)


def test_attention_maps_cost_one_attention_per_layer(model, monkeypatch):
    """output_attentions=True runs each layer's attention once (its output feeds the layer and its
    weights are returned) and changes no output bit."""
    batch = model.tokenize(TEXTS)
    with torch.no_grad():
        plain = model(**batch.model_inputs(), output_hidden_states=True)
        calls = []
        original = qkv.attention
        monkeypatch.setattr("qkv.nn.attention._attention", lambda *a, **k: calls.append(1) or original(*a, **k))
        with_maps = model(**batch.model_inputs(), output_hidden_states=True, output_attentions=True)
    assert len(calls) == model.config.num_hidden_layers
    for a, b in zip(plain.hidden_states, with_maps.hidden_states, strict=True):
        assert torch.equal(a, b)


def test_beyond_max_positions_is_an_error_naming_the_limit(model):
    with pytest.raises(ValueError, match=r"513 tokens, more than this model's limit of 512 "
                                         r"\(max_position_embeddings=512"):
        model(torch.full((1, 513), 1000))
    with pytest.raises(ValueError, match=r"texts\[1\] is \d+ tokens long, more than max_length=512.*truncation=True"):
        model.tokenize(["short", "word " * 600])
    assert model.tokenize("word " * 600, truncation=True).input_ids.shape == (1, 512)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(input_ids=torch.ones(2, 3)), TypeError, "input_ids must be an integer tensor"),
    (dict(input_ids=torch.ones(3, dtype=torch.long)), ValueError, r"shape \(batch, seq\)"),
    (dict(input_ids=torch.full((1, 3), 30522)), ValueError, r"vocab_size=30522"),
    (dict(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 4)), ValueError,
     r"attention_mask must have the shape of input_ids \(1, 3\), got \(1, 4\)"),
    (dict(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=[[1, 1, 1]]), TypeError,
     "attention_mask must be a torch.Tensor"),
    (dict(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.full((1, 3), 2)), ValueError, "0/1"),
    (dict(input_ids=torch.ones(1, 3, dtype=torch.long), token_type_ids=torch.full((1, 3), 2)), ValueError,
     r"token_type_ids must lie in \[0, type_vocab_size=2\), got values in \[2, 2\]"),
])
def test_bad_inputs(model, kwargs, error, words):
    with pytest.raises(error, match=words):
        model(**kwargs)


def test_compare_word_in_contexts(model):
    """"bank" by a river and "bank" with cash: one static vector, two contextual ones."""
    result = compare_word_in_contexts(model, "I sat on the river bank", "I deposited cash at the bank", "Bank")
    assert result["tokens_a"] == result["tokens_b"] == ["bank"]
    assert result["static_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert len(result["contextual_cosine_by_layer"]) == 7
    assert result["contextual_cosine"] == result["contextual_cosine_by_layer"][-1]
    assert result["contextual_cosine"] < 0.9  # context moved the vectors apart
    # the contextual vector is the encoder output at the word's token
    vectors = word_vectors(model, "I sat on the river bank", "bank")
    batch = model.tokenize("I sat on the river bank")
    with torch.no_grad():
        hidden = model(**batch.model_inputs()).last_hidden_state
    assert vectors.positions == [6]
    torch.testing.assert_close(vectors.contextual[-1], hidden[0, 6])
    torch.testing.assert_close(vectors.static, model.embeddings.word_embeddings.weight[2924])


def test_word_split_into_pieces_is_averaged(model):
    vectors = word_vectors(model, "Tokenization splits words", "tokenization")
    assert len(vectors.tokens) > 1 and vectors.tokens[1].startswith("##")
    assert vectors.positions == list(range(1, 1 + len(vectors.tokens)))


def test_missing_word_is_an_error(model):
    with pytest.raises(ValueError, match=r"word 'bank' does not occur \(as a whole word\) in 'I sat on the riverbank'"):
        compare_word_in_contexts(model, "I sat on the riverbank", "the bank", "bank")
