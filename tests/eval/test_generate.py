"""Decoding: cache vs no cache, batches vs single rows, beam/greedy/sampling rules, stopping, sparse models, autocast,
and token-for-token agreement with Hugging Face transformers' `generate` on a GPT-2 with the same weights."""
import copy

import pytest
import torch

import spdf
from spdf.eval.beam_search import beam_search
from spdf.eval.decoding import Rows, Runner, ban_repeated_ngrams
from spdf.eval.generate import DECODING_PRESETS, DecodingConfig, generate

EOS = 3


def peaked_gpt(seed: int = 0, **overrides) -> spdf.GPT:
    """`tiny-test` (vocab 128, ctx 64) with large weights: at GPT-3 init every next-token distribution is nearly
    flat, so argmax and beam ranks would hinge on float rounding; here they have clear winners."""
    torch.manual_seed(seed)
    model = spdf.GPT.from_name("tiny-test", **overrides)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 128, (n,), generator=g).tolist() for n in lengths]


PROMPTS = prompts_of((5, 9, 3, 12, 7, 1, 7))
MODES = {"greedy": DecodingConfig.from_name("greedy", max_new_tokens=20),
         "paper": DecodingConfig.from_name("paper", max_new_tokens=20),
         "sample": DecodingConfig.from_name("sample", max_new_tokens=20, seed=3)}


@pytest.fixture(scope="module")
def model():
    return peaked_gpt()


@pytest.mark.parametrize("mode", MODES)
def test_cached_and_uncached_decoding_give_the_same_tokens(model, mode):
    cached = generate(model, PROMPTS, MODES[mode], eos_id=EOS, batch_size=4)
    assert cached == generate(model, PROMPTS, MODES[mode], eos_id=EOS, batch_size=4, use_cache=False)
    assert any(len(out) == 20 for out in cached) and any(len(out) < 20 for out in cached)  # both stops occur


@pytest.mark.parametrize("mode", ["greedy", "paper"])
def test_a_left_padded_batch_gives_the_outputs_of_one_row_at_a_time(model, mode):
    one_by_one = [generate(model, [p], MODES[mode], eos_id=EOS)[0] for p in PROMPTS]
    assert generate(model, PROMPTS, MODES[mode], eos_id=EOS, batch_size=16) == one_by_one
    assert generate(model, PROMPTS, MODES[mode], eos_id=EOS, batch_size=3) == one_by_one


@pytest.mark.parametrize("length_penalty", [1.0, 0.8, -2.0])
def test_beam_width_one_is_greedy(model, length_penalty):
    greedy = generate(model, PROMPTS, MODES["greedy"], eos_id=EOS)
    config = DecodingConfig(num_beams=1, length_penalty=length_penalty, max_new_tokens=20)
    rows = Rows.left_padded(PROMPTS, 20, model.config.n_ctx, "cpu")
    with torch.inference_mode():
        assert beam_search(Runner(model, rows, True), rows, config, EOS, []) == greedy


def test_sampling_is_reproducible_from_its_seed_and_top_k_1_is_greedy(model):
    sample = MODES["sample"]
    first = generate(model, PROMPTS, sample, eos_id=None)
    assert first == generate(model, PROMPTS, sample, eos_id=None)
    assert first != generate(model, PROMPTS, DecodingConfig.from_name("sample", max_new_tokens=20, seed=4),
                             eos_id=None)
    greedy = generate(model, PROMPTS, MODES["greedy"], eos_id=EOS)
    assert first != greedy
    for narrow in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4)):
        config = DecodingConfig(do_sample=True, max_new_tokens=20, **narrow)
        assert generate(model, PROMPTS, config, eos_id=EOS) == greedy, narrow


def test_no_repeat_ngram_size_forbids_repeats_that_greedy_makes(model):
    prompts = prompts_of((4, 6, 2), seed=5)
    plain = generate(model, prompts, DecodingConfig(max_new_tokens=40), eos_id=None)

    def repeats(seq, n):
        grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
        return len(grams) - len(set(grams))

    assert any(repeats(p + out, 2) for p, out in zip(prompts, plain))  # the model loops without the rule
    for n in (1, 2, 3):
        for beams in (1, 4):
            config = DecodingConfig(max_new_tokens=40, num_beams=beams, no_repeat_ngram_size=n)
            for p, out in zip(prompts, generate(model, prompts, config, eos_id=None)):
                assert repeats(p + out, n) == repeats(p, n), (n, beams)  # the prompt may keep its own


def test_ngram_ban_ignores_left_padding():
    scores = torch.zeros(2, 10)
    seq = torch.tensor([[5, 6, 5, 7, 5], [0, 0, 9, 1, 9]])  # row 1: two columns of padding (id 0)
    ban_repeated_ngrams(scores, seq, torch.tensor([0, 2]), 2)
    assert scores[0].isinf().nonzero().flatten().tolist() == [6, 7]  # "5" was followed by 6 and by 7
    assert scores[1].isinf().nonzero().flatten().tolist() == [1]
    padded = torch.zeros(1, 10)
    ban_repeated_ngrams(padded, torch.tensor([[9, 1, 9]]), torch.tensor([2]), 2)  # "9 1" lies in the padding
    assert not padded.isinf().any()


def test_length_penalty_trades_score_for_length(model):
    prompts = prompts_of((3, 5, 8, 4, 6, 2), seed=7)

    def total_length(lp):
        config = DecodingConfig(num_beams=6, length_penalty=lp, early_stopping="never", max_new_tokens=24)
        return sum(len(o) for o in generate(model, prompts, config, eos_id=EOS))

    short, neutral, long = total_length(-3.0), total_length(0.0), total_length(3.0)
    assert short <= neutral <= long and short < long


def test_eos_and_stop_sequences_end_a_row_and_are_not_returned(model):
    free = generate(model, PROMPTS, MODES["greedy"], eos_id=None)
    assert all(len(out) == 20 for out in free)
    row = free[1]
    eos = row[4]
    assert generate(model, PROMPTS[1:2], MODES["greedy"], eos_id=eos)[0] == row[:row.index(eos)]
    stop = row[6:8]
    cut = next(i for i in range(len(row) - 1) if row[i:i + 2] == stop)
    out = generate(model, PROMPTS[1:2], MODES["greedy"], eos_id=None, stop_sequences=[[127, 126, 125], stop])
    assert out[0] == row[:cut]
    # a one-token stop sequence acts like EOS, in beam search too
    for config in (MODES["greedy"], MODES["paper"]):
        assert (generate(model, PROMPTS, config, eos_id=None, stop_sequences=[[EOS]])
                == generate(model, PROMPTS, config, eos_id=EOS))


def test_generation_stops_where_the_context_ends(model):
    n_ctx = model.config.n_ctx
    prompts = [prompts_of((n_ctx,))[0], prompts_of((n_ctx - 2,))[0], [5]]
    for config in (DecodingConfig(max_new_tokens=10), DecodingConfig(max_new_tokens=10, num_beams=3)):
        lengths = [len(o) for o in generate(model, prompts, config, eos_id=None)]
        assert lengths == [1, 3, 10]


def _sparse_copies(model):
    masked = copy.deepcopy(model)
    spdf.sparsify(masked, 0.75, seed=0)
    compressed = copy.deepcopy(model)
    spdf.sparsify(compressed, 0.75, seed=0, backend="compressed", tile=(16, 16))
    return masked, compressed


@pytest.mark.parametrize("mode", ["greedy", "paper"])
def test_sparse_masked_compressed_and_densified_models_decode_alike(model, mode):
    masked, compressed = _sparse_copies(model)
    out = generate(masked, PROMPTS, MODES[mode], eos_id=EOS)
    assert out != generate(model, PROMPTS, MODES[mode], eos_id=EOS)  # sparsity changed the model
    assert generate(compressed, PROMPTS, MODES[mode], eos_id=EOS) == out
    assert generate(spdf.densify(masked), PROMPTS, MODES[mode], eos_id=EOS) == out


@pytest.mark.parametrize("mode", ["greedy", "paper"])
def test_decoding_under_bf16_autocast(model, mode):
    masked, compressed = _sparse_copies(model)
    fp32 = generate(model, PROMPTS, MODES[mode], eos_id=EOS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for m in (model, masked, compressed):
            out = generate(m, PROMPTS, MODES[mode], eos_id=EOS)
            assert len(out) == len(PROMPTS) and all(len(o) <= 20 for o in out)
            assert all(0 <= t < 128 and t != EOS for o in out for t in o)
        bf16 = generate(model, PROMPTS, MODES[mode], eos_id=EOS)
    # bf16 rounding may flip a near tie somewhere; most first tokens still agree with fp32
    assert sum(a[:1] == b[:1] for a, b in zip(bf16, fp32)) >= len(PROMPTS) - 2


def test_generate_keeps_the_model_mode_and_shows_progress(model, capsys):
    model.train()
    try:
        out = generate(model, PROMPTS, MODES["greedy"], eos_id=EOS, batch_size=2, progress=True)
        assert model.training
    finally:
        model.eval()
    assert out == generate(model, PROMPTS, MODES["greedy"], eos_id=EOS)  # dropout was off meanwhile (none here)
    assert "7/7" in capsys.readouterr().err


def test_presets():
    assert DECODING_PRESETS["paper"] == DecodingConfig(num_beams=10, length_penalty=0.8, no_repeat_ngram_size=4,
                                                       max_new_tokens=64)
    assert DecodingConfig.from_name("greedy").num_beams == 1 and not DecodingConfig.from_name("greedy").do_sample
    assert DecodingConfig.from_name("paper", num_beams=4).num_beams == 4
    assert DecodingConfig.from_name("paper").to_dict()["length_penalty"] == 0.8


@pytest.mark.parametrize("settings,message", [
    (dict(num_beams=0), "decoding.num_beams must be an integer >= 1, got 0"),
    (dict(temperature=0.0), "decoding.temperature must be > 0, got 0.0"),
    (dict(top_p=0.0), r"decoding.top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"decoding.top_p must be in \(0, 1\], got 1.5"),
    (dict(max_new_tokens=0), "decoding.max_new_tokens must be an integer >= 1, got 0"),
    (dict(top_k=-1), "decoding.top_k must be an integer >= 0"),
    (dict(early_stopping="sometimes"), "decoding.early_stopping must be true, false or 'never'"),
    (dict(do_sample=True, num_beams=4), "sampling .* with num_beams > 1 is not supported"),
])
def test_bad_settings_are_one_line_value_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        DecodingConfig(**settings)


def test_bad_names_and_inputs(model):
    with pytest.raises(ValueError, match="unknown decoding 'papr'; known: paper, greedy, sample"):
        DecodingConfig.from_name("papr")
    with pytest.raises(ValueError, match="unknown decoding setting 'beams'; allowed: .*num_beams"):
        DecodingConfig.from_name("paper", beams=3)
    greedy = MODES["greedy"]
    with pytest.raises(ValueError, match="prompt 1 has 65 tokens, longer than the model's context of 64 tokens"):
        generate(model, [[5], [5] * 65], greedy, eos_id=EOS)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(model, [[]], greedy, eos_id=EOS)
    with pytest.raises(ValueError, match=r"token id outside the vocabulary \[0, 128\)"):
        generate(model, [[128]], greedy, eos_id=EOS)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        generate(model, [[5]], greedy, eos_id=EOS, batch_size=0)
    with pytest.raises(ValueError, match="stop sequence"):
        generate(model, [[5]], greedy, eos_id=EOS, stop_sequences=[[]])


# --- Hugging Face transformers on the same weights -------------------------------------------------------------

def hf_twin(model: spdf.GPT):
    """transformers' GPT2LMHeadModel with `model`'s shape and weights (GPT-2's layout: Conv1D stores (in, out))."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(**model.hf_gpt2_config(), bos_token_id=EOS, eos_token_id=EOS, pad_token_id=0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.load_state_dict(model.hf_gpt2_state_dict())
    return hf


def hf_generate(hf, prompts, **settings):
    """transformers' generate on a left-padded batch; new tokens up to (without) the first EOS."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, eos_token_id=EOS, pad_token_id=0, do_sample=False, **settings)
    new = [row[width:].tolist() for row in out]
    return [row[:row.index(EOS)] if EOS in row else row for row in new]


HF_SETTINGS = [dict(num_beams=1),
               dict(num_beams=4, length_penalty=0.8, no_repeat_ngram_size=2),
               dict(num_beams=10, length_penalty=0.8, no_repeat_ngram_size=4),  # the `paper` decoding
               dict(num_beams=5, length_penalty=2.0, early_stopping=True),
               dict(num_beams=5, length_penalty=-1.0, early_stopping="never"),
               dict(num_beams=3, no_repeat_ngram_size=1)]


@pytest.mark.parametrize("settings", HF_SETTINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_same_tokens_as_transformers_generate_on_the_same_weights(model, settings):
    hf = hf_twin(model)
    x = torch.tensor([PROMPTS[3]])
    torch.testing.assert_close(hf(x).logits, model(x)[0], rtol=1e-4, atol=1e-4)
    ours = generate(model, PROMPTS, DecodingConfig(max_new_tokens=30, **settings), eos_id=EOS)
    # one prompt at a time: transformers counts left padding inside n-grams, spdf does not
    assert ours == [hf_generate(hf, [p], max_new_tokens=30, **settings)[0] for p in PROMPTS]
    assert any(len(o) < 30 for o in ours)  # some rows ended at EOS


@pytest.mark.parametrize("num_beams", [1, 4])
def test_same_tokens_as_transformers_on_a_left_padded_batch(model, num_beams):
    hf = hf_twin(model)
    config = DecodingConfig(max_new_tokens=25, num_beams=num_beams, length_penalty=0.8)
    assert (generate(model, PROMPTS, config, eos_id=EOS)
            == hf_generate(hf, PROMPTS, max_new_tokens=25, num_beams=num_beams, length_penalty=0.8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_decoding_matches_cpu_and_runs_in_bf16(model, mode):
    cuda = copy.deepcopy(model).cuda()
    if mode != "sample":  # a CUDA generator draws other numbers than the CPU one
        assert generate(cuda, PROMPTS, MODES[mode], eos_id=EOS) == generate(model, PROMPTS, MODES[mode], eos_id=EOS)
    masked, compressed = (m.cuda() for m in _sparse_copies(model))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for m in (cuda, masked, compressed):
            out = generate(m, PROMPTS, MODES[mode], eos_id=EOS)
            assert all(len(o) <= 20 for o in out)
        assert (generate(cuda, PROMPTS, MODES[mode], eos_id=EOS)
                == generate(cuda, PROMPTS, MODES[mode], eos_id=EOS, use_cache=False))
