"""Decoder.generate: prefill once, then one token per step from the cache. Greedy decoding equals
recomputing the full sequence every step; ragged prompts equal each prompt alone; sampling obeys
temperature, top-k and top-p; eos ends rows; bad arguments are refused."""

import pytest
import torch

from qkv.cache import CacheFullError, KVCache, PagedKVCache
from qkv.nn import Decoder, filter_logits, sample_next_token


def make_model(**options) -> Decoder:
    torch.manual_seed(0)
    defaults = dict(vocab_size=23, dim=16, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=24)
    model = Decoder(**{**defaults, **options})
    with torch.no_grad():  # large random weights: confident, varied next-token choices
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.5 * torch.randn_like(p))
    return model.double().eval()


def greedy_by_recomputation(model, prompt, steps):
    seq = prompt
    for _ in range(steps):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, prompt.shape[1]:]


@pytest.mark.parametrize("positional", ["rope", "alibi", "learned"])
def test_greedy_equals_recomputation(positional):
    model = make_model(positional=positional, max_positions=64)
    prompt = torch.randint(0, 23, (3, 6))
    out = model.generate(prompt, 12, temperature=0)
    assert out.shape == (3, 12) and out.dtype == torch.int64
    assert torch.equal(out, greedy_by_recomputation(model, prompt, 12))
    assert len(set(out.flatten().tolist())) > 3  # not a degenerate constant sequence


def test_prefills_once_then_one_token_per_step():
    model = make_model()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    model.generate(torch.randint(0, 23, (2, 7)), 5, temperature=0)
    assert calls == [(2, 7)] + [(2, 1)] * 4


def test_ragged_prompts_equal_each_prompt_alone():
    model = make_model()
    lengths = [3, 8, 5]
    prompts = torch.randint(0, 23, (3, 8))
    out = model.generate(prompts, 7, temperature=0, lengths=torch.tensor(lengths))
    for b, n in enumerate(lengths):
        assert torch.equal(out[b], model.generate(prompts[b:b + 1, :n], 7, temperature=0)[0])


def test_paged_cache_and_exact_default_capacity():
    model = make_model()
    prompt = torch.randint(0, 23, (2, 5))
    pool = PagedKVCache(num_pages=8, page_size=4, **model.cache_spec())
    seqs = [pool.add_sequence(), pool.add_sequence()]
    out = model.generate(prompt, 6, temperature=0, cache=pool.batch(seqs))
    assert torch.equal(out, model.generate(prompt, 6, temperature=0))
    assert [pool.length(s) for s in seqs] == [10, 10]  # the last token is returned, not fed back


def test_eos_ends_rows_and_stops_when_all_are_done():
    model = make_model()
    prompt = torch.randint(0, 23, (2, 4))
    free_run = model.generate(prompt, 10, temperature=0)
    eos = int(free_run[0, 2])
    out = model.generate(prompt, 10, temperature=0, eos=eos)
    first = (free_run[0] == eos).nonzero()[0, 0]
    assert torch.equal(out[0, :first + 1], free_run[0, :first + 1]) and bool((out[0, first:] == eos).all())
    hits = (free_run[1] == eos).nonzero()
    if len(hits):  # the batch stops as soon as both rows have finished
        assert out.shape[1] == max(int(first), int(hits[0, 0])) + 1
    else:
        assert out.shape[1] == 10 and torch.equal(out[1], free_run[1])


def generated_with_eos(free_run: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """What generation with ``eos_ids`` must return, from the free run without eos: each row stops
    at its first eos id and then repeats the first of ``eos_ids``; the batch ends when all stopped."""
    stops = []
    for row in free_run.tolist():
        hits = [i for i, token in enumerate(row) if token in eos_ids]
        stops.append(hits[0] if hits else None)
    length = free_run.shape[1] if None in stops else max(stops) + 1
    expected = free_run[:, :length].clone()
    for r, stop in enumerate(stops):
        if stop is not None:
            expected[r, stop + 1:] = eos_ids[0]
    return expected


def test_eos_list_ends_rows_at_any_of_its_ids():
    model = make_model()
    prompt = torch.randint(0, 23, (2, 4))
    free_run = model.generate(prompt, 10, temperature=0)
    # row 0 ends on the second id and then repeats the first; the batch ends when row 1 ends too
    eos = [int(free_run[1, 5]), int(free_run[0, 2])]
    expected = generated_with_eos(free_run, eos)
    assert expected.shape[1] < 10 and not torch.equal(expected, free_run[:, :expected.shape[1]])
    assert torch.equal(model.generate(prompt, 10, temperature=0, eos=eos), expected)
    # a row that never meets eos runs to max_new_tokens while the other repeats its eos
    eos = [int(free_run[0, -2])]
    expected = generated_with_eos(free_run, eos)
    assert expected.shape[1] == 10
    assert torch.equal(model.generate(prompt, 10, temperature=0, eos=eos), expected)
    assert torch.equal(model.generate(prompt[:1], 10, temperature=0, eos=[99 % 23, *eos]),
                       generated_with_eos(free_run[:1], [99 % 23, *eos]))


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = make_model()
    prompt = torch.randint(0, 23, (2, 5))
    greedy = model.generate(prompt, 8, temperature=0)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(prompt, 8, temperature=1.5, top_k=1, generator=gen), greedy)
    assert torch.equal(model.generate(prompt, 8, temperature=1.5, top_p=1e-9, generator=gen), greedy)


def test_sampling_is_reproducible_with_a_generator():
    model = make_model()
    prompt = torch.randint(0, 23, (2, 5))
    a = model.generate(prompt, 10, generator=torch.Generator().manual_seed(5))
    b = model.generate(prompt, 10, generator=torch.Generator().manual_seed(5))
    c = model.generate(prompt, 10, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_tiny_temperature_tends_to_greedy():
    """``logits / temperature`` past float32's range is inf, and softmax of inf is NaN: a tiny but
    valid temperature must give the argmax, not a multinomial error."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [50.0, -20.0, 49.0]])
    gen = torch.Generator().manual_seed(0)
    for temperature in (1e-30, 1e-38, 1e-45):
        draws = sample_next_token(logits, temperature=temperature, top_k=2, top_p=0.9, generator=gen)
        assert draws.tolist() == [1, 0], temperature
        assert sample_next_token(logits, temperature=temperature, generator=gen).tolist() == [1, 0]


def test_filter_logits_keeps_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]
    # nucleus 0.75: 0.4 + 0.3 = 0.7 < 0.75, so 0.15 joins; 0.85 >= 0.75 stops there
    kept = torch.isfinite(filter_logits(logits, top_p=0.75))
    assert kept.tolist() == [[False, True, False, True, True]]
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=0.1)).tolist() == [[False, True, False, False, False]]
    assert torch.equal(filter_logits(logits, top_k=9, top_p=1.0), logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nucleus_of_half_precision_logits_is_the_smallest_set_reaching_top_p(dtype):
    """bfloat16/float16 logits (B, V): the nucleus is that of their exact probabilities (summed in
    float64 here), not of a cumulative sum rounded in half precision, which drifts by hundreds of
    tokens over a large vocabulary."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 4000, generator=g, dtype=torch.float64) * 2).to(dtype)
    for top_p in (0.5, 0.9, 0.99):
        kept = torch.isfinite(filter_logits(logits, top_p=top_p))
        probs = torch.softmax(logits.double(), -1)
        mass = (probs * kept).sum(-1)
        smallest_kept = probs.masked_fill(~kept, 2.0).amin(-1)
        assert (mass >= top_p - 1e-6).all(), (top_p, mass)
        assert (mass - smallest_kept < top_p + 1e-6).all(), (top_p, mass - smallest_kept)


def test_sampling_follows_the_tempered_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]]).expand(40000, 4)
    gen = torch.Generator().manual_seed(0)
    for temperature in (0.5, 2.0):
        draws = sample_next_token(logits, temperature=temperature, generator=gen)
        freq = torch.bincount(draws, minlength=4).double() / len(draws)
        expected = torch.softmax(logits[0].double() / temperature, -1)
        # binomial standard error <= sqrt(0.25 / 40000) = 0.0025; 5 sigma
        torch.testing.assert_close(freq, expected, atol=0.0125, rtol=0)
    draws = sample_next_token(logits, top_k=2, generator=gen)
    assert set(draws.tolist()) == {0, 3}


def test_default_cache_is_exactly_big_enough_and_misses_the_last_token():
    """The last returned token is not fed back: a cache of max(lengths) + max_new_tokens - 1
    suffices, and continuing from it starts by feeding that token."""
    model = make_model()
    prompt = torch.randint(0, 23, (2, 5))
    lengths = torch.tensor([5, 3])
    out = model.generate(prompt, 4, temperature=0, lengths=lengths)
    cache = KVCache(batch_size=2, capacity=5 + 4 - 1, **model.cache_spec())
    assert torch.equal(model.generate(prompt, 4, temperature=0, lengths=lengths, cache=cache), out)
    assert cache.lengths.tolist() == [5 + 3, 3 + 3]
    with pytest.raises(CacheFullError, match="capacity 7"):
        model.generate(prompt, 4, temperature=0, lengths=lengths,
                       cache=KVCache(batch_size=2, capacity=7, **model.cache_spec()))
    roomy = KVCache(batch_size=2, capacity=16, **model.cache_spec())
    model.generate(prompt, 4, temperature=0, lengths=lengths, cache=roomy)
    next_logits = model(out[:, -1:], roomy)[:, 0]
    for b, n in enumerate(lengths.tolist()):
        sequence = torch.cat([prompt[b, :n], out[b]])[None]
        torch.testing.assert_close(next_logits[b], model(sequence)[0, -1], atol=1e-10, rtol=1e-10)


def test_a_paged_pool_is_not_a_cache():
    model = make_model()
    pool = PagedKVCache(num_pages=8, page_size=4, **model.cache_spec())
    with pytest.raises(TypeError, match=r"cache: a PagedKVCache is a pool .*cache=pool.batch\(seq_ids\)"):
        model.generate(torch.randint(0, 23, (1, 4)), 3, cache=pool)


def test_max_new_tokens_zero_and_small_caches():
    model = make_model()
    prompt = torch.randint(0, 23, (2, 5))
    assert model.generate(prompt, 0).shape == (2, 0)
    with pytest.raises(CacheFullError, match="capacity 6"):
        model.generate(prompt, 4, cache=KVCache(batch_size=2, capacity=6, **model.cache_spec()))


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(eos=23), "eos"),
    (dict(eos=[]), "eos"),
    (dict(lengths=[0, 3]), "lengths"),
    (dict(lengths=[2, 6]), "lengths"),
    (dict(lengths=[2]), "lengths"),
])
def test_bad_arguments(kwargs, match):
    model = make_model()
    args = dict(max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=match):
        model.generate(torch.randint(0, 23, (2, 5)), **args)
