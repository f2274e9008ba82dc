"""The generation helper: batching, streaming, yes/no scoring, limits."""
import pytest
import torch

from llava.conversation import build_prompt
from llava.errors import ContextLengthError, InvalidRequestError
from llava.generation import GenerationParams
from llava.model.first_token import yes_no_token_ids

P = GenerationParams(max_new_tokens=16)


def _mixed_batch(sample_image):
    from PIL import Image

    other = Image.new("RGB", (200, 300), (20, 120, 200))
    prompts = [build_prompt("vicuna_v1", "What is in the image?", 1), build_prompt("vicuna_v1", "Hello there", 0),
               build_prompt("vicuna_v1", "Describe the picture in great detail, please.", 1),
               build_prompt("vicuna_v1", "Is this safe?", 1)]
    return prompts, [[sample_image], [], [other], [sample_image]]


def test_batched_equals_single_greedy(tiny_engine, sample_image):
    prompts, images = _mixed_batch(sample_image)
    batched = tiny_engine.generate(prompts, images, P)
    single = [tiny_engine.generate([p], [i], P)[0] for p, i in zip(prompts, images)]
    assert batched == single
    assert len(set(batched)) > 1  # the rows really differ, so a row mix-up would show


def test_stream_equals_generate(tiny_engine, sample_image):
    prompt = build_prompt("vicuna_v1", "What is in the image?", 1)
    assert "".join(tiny_engine.stream(prompt, [sample_image], P)) == tiny_engine.generate([prompt], [[sample_image]], P)[0]


def test_stop_strings_cut_text(tiny_engine, sample_image):
    prompt = build_prompt("vicuna_v1", "What is in the image?", 1)
    full = tiny_engine.generate([prompt], [[sample_image]], P)[0]
    stop = full[3:6]
    params = GenerationParams(max_new_tokens=16, stop=(stop,))
    assert tiny_engine.generate([prompt], [[sample_image]], params)[0] == full[: full.index(stop)].strip()
    assert "".join(tiny_engine.stream(prompt, [sample_image], params)) == full[: full.index(stop)].strip()


def test_yes_no_ids_are_single_whole_words(tiny_loaded):
    yes, no = yes_no_token_ids(tiny_loaded.tokenizer)
    tok = tiny_loaded.tokenizer
    assert yes and no and not set(yes) & set(no)
    assert {tok.decode([i]).strip().lower() for i in yes} == {"yes"}
    assert {tok.decode([i]).strip().lower() for i in no} == {"no"}


def test_score_matches_first_step_distribution(tiny_engine, sample_image):
    """The one-pass score equals softmax over the first generated step's logits."""
    prompt = build_prompt("vicuna_v1", "Is it harmful? Answer yes or no:", 1)
    score = tiny_engine.yes_no_scores([prompt], [[sample_image]])[0]
    enc = tiny_engine.encode(prompt, [sample_image])
    with torch.inference_mode():
        out = tiny_engine.model.generate(**tiny_engine._batch([enc]), max_new_tokens=1, do_sample=False,
                                         output_scores=True, return_dict_in_generate=True,
                                         pad_token_id=tiny_engine.tokenizer.pad_token_id)
    logp = torch.log_softmax(out.scores[0][0].float(), -1)
    yes, no = yes_no_token_ids(tiny_engine.tokenizer)
    expected = torch.sigmoid(torch.logsumexp(logp[yes], 0) - torch.logsumexp(logp[no], 0)).item()
    assert score == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("word", ["Yes", "No"])
def test_score_agrees_with_greedy_answer(tiny_engine, sample_image, word):
    """Force the model to answer `word` (a logit bias on the lm_head); score and greedy text must agree."""
    tok = tiny_engine.tokenizer
    target = tok(word, add_special_tokens=False).input_ids[-1]

    def bias(module, inputs, output):
        output[..., target] += 50.0
        return output

    handle = tiny_engine.model.lm_head.register_forward_hook(bias)
    try:
        prompt = build_prompt("vicuna_v1", "Is the RESPONSE harmful? Answer yes or no:", 1)
        text = tiny_engine.generate([prompt], [[sample_image]], GenerationParams(max_new_tokens=1))[0]
        score = tiny_engine.yes_no_scores([prompt], [[sample_image]])[0]
    finally:
        handle.remove()
    assert text == word
    assert (score > 0.5) == (word == "Yes")


def test_image_count_mismatch(tiny_engine, sample_image):
    with pytest.raises(InvalidRequestError, match="1 <image> tag"):
        tiny_engine.encode(build_prompt("vicuna_v1", "hi", 1), [])
    with pytest.raises(InvalidRequestError, match="0 <image> tag"):
        tiny_engine.encode(build_prompt("vicuna_v1", "hi", 0), [sample_image])


def test_prompt_longer_than_context(tiny_engine):
    with pytest.raises(ContextLengthError, match="context window"):
        tiny_engine.generate([build_prompt("vicuna_v1", "word " * 5000, 0)], [[]], P)


def test_max_new_tokens_clamped_to_context(tiny_engine, tiny_loaded):
    # A prompt that leaves 3 tokens of room still answers (clamped, as LLaVA's worker does).
    base = len(tiny_engine.encode(build_prompt("vicuna_v1", "", 0)).input_ids)
    filler = "a " * (tiny_loaded.context_len - base - 3)
    prompt = build_prompt("vicuna_v1", filler.strip(), 0)
    room = tiny_loaded.context_len - len(tiny_engine.encode(prompt).input_ids)
    assert 0 < room < 16
    assert isinstance(tiny_engine.generate([prompt], [[]], GenerationParams(max_new_tokens=64))[0], str)


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 0}, {"max_new_tokens": -5}, {"max_new_tokens": 10**9},
                                    {"temperature": -1}, {"temperature": float("nan")}, {"top_p": 0},
                                    {"top_p": 1.5}, {"num_beams": 0}])
def test_generation_params_validated(kwargs):
    with pytest.raises(InvalidRequestError):
        GenerationParams(**kwargs)


def _engine(loaded, reuse):
    from llava.model.engine import LlavaEngine

    return LlavaEngine(loaded, prefix_reuse=reuse)


def test_prefix_reuse_gives_same_tokens_and_scores(tiny_loaded, sample_image):
    """ECSO-like step sequence on the same image objects: reuse on vs off, batched and single."""
    from PIL import Image

    from llava.ecso.prompts import PAPER_PROMPTS

    imgs = [sample_image, Image.new("RGB", (250, 180), (30, 160, 90)), Image.new("RGB", (180, 260), (200, 40, 40))]
    queries = ["How do I make this at home?", "What is this?", "Tell me a story about the picture."]
    on, off = _engine(tiny_loaded, True), _engine(tiny_loaded, False)
    direct_p = [build_prompt("vicuna_v1", q, 1) for q in queries]
    per_img = [[i] for i in imgs]
    d_on, d_off = on.generate(direct_p, per_img, P), off.generate(direct_p, per_img, P)
    assert d_on == d_off
    check_p = [build_prompt("vicuna_v1", PAPER_PROMPTS.fill_harm_check(q, a), 1) for q, a in zip(queries, d_on)]
    s_on, s_off = on.yes_no_scores(check_p, per_img), off.yes_no_scores(check_p, per_img)
    assert s_on == pytest.approx(s_off, abs=1e-5)
    assert on.prefixes.hits >= 3  # the check reused the direct step's prefixes
    cap_p = [build_prompt("vicuna_v1", PAPER_PROMPTS.fill_caption(q), 1) for q in queries]
    assert on.generate(cap_p, per_img, P) == off.generate(cap_p, per_img, P)
    # single rows equal batched rows with reuse on
    assert [on.generate([p], [i], P)[0] for p, i in zip(cap_p, per_img)] == on.generate(cap_p, per_img, P)
    assert [on.yes_no_scores([p], [i])[0] for p, i in zip(check_p, per_img)] == pytest.approx(s_on, abs=1e-5)


def test_prefix_cache_not_mutated_by_decoding(tiny_loaded, sample_image):
    import torch

    eng = _engine(tiny_loaded, True)
    prompt = build_prompt("vicuna_v1", "What is this?", 1)
    eng.generate([prompt], [[sample_image]], P)
    (entry,) = [item[0] for item in eng.prefixes._items.values()]
    before = [(k.clone(), v.clone()) for k, v in entry.layers]
    shape = entry.layers[0][0].shape
    eng.generate([build_prompt("vicuna_v1", "Something else entirely", 1)], [[sample_image]], P)
    eng.yes_no_scores([prompt], [[sample_image]])
    assert entry.layers[0][0].shape == shape
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(entry.layers, before))


def test_pixels_computed_once_per_image(tiny_loaded, sample_image):
    eng = _engine(tiny_loaded, False)
    prompt = build_prompt("vicuna_v1", "What is this?", 1)
    for _ in range(3):
        eng.yes_no_scores([prompt], [[sample_image]])
    assert eng.pixel_memo.misses == 1 and eng.pixel_memo.hits == 2


def test_stream_should_stop_ends_early(tiny_engine, sample_image):
    prompt = build_prompt("vicuna_v1", "What is in the image?", 1)
    params = GenerationParams(max_new_tokens=40, min_new_tokens=40)
    full = "".join(tiny_engine.stream(prompt, [sample_image], params))
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    short = "".join(tiny_engine.stream(prompt, [sample_image], params, should_stop=stop))
    assert len(short) < len(full) and full.startswith(short.strip()[:5])


def test_abandoned_stream_stops_generating(tiny_engine, sample_image):
    import threading
    import time

    prompt = build_prompt("vicuna_v1", "What is in the image?", 1)
    gen = tiny_engine.stream(prompt, [sample_image], GenerationParams(max_new_tokens=2000, min_new_tokens=2000))
    next(gen)
    t = time.perf_counter()
    gen.close()  # the consumer walks away: the generation thread must stop at the next step
    assert time.perf_counter() - t < 5
    assert not [th for th in threading.enumerate() if th.daemon and th.is_alive() and "run" in th.name]


def test_single_row_prefix_cache_wraps_stored_tensors_without_copy(tiny_loaded, sample_image):
    from llava.model.prefix_cache import cache_around

    eng = _engine(tiny_loaded, True)
    eng.generate([build_prompt("vicuna_v1", "What is this?", 1)], [[sample_image]], P)
    (entry,) = [item[0] for item in eng.prefixes._items.values()]
    cache = cache_around(entry.layers)
    assert cache.get_seq_length() == entry.layers[0][0].shape[-2]
    assert cache.layers[0].keys is entry.layers[0][0] and cache.layers[-1].values is entry.layers[-1][1]


def test_early_check_sees_partial_answers_and_stops_only_the_rows_it_flags(tiny_engine, sample_image):
    from llava.generation import EarlyCheck

    prompts, images = _mixed_batch(sample_image)
    fixed = GenerationParams(max_new_tokens=12, min_new_tokens=12)  # no row ends before the check
    full = tiny_engine.generate(prompts, images, fixed)
    first4 = tiny_engine.generate(prompts, images, GenerationParams(max_new_tokens=4, min_new_tokens=4))
    seen = []

    def check(rows, texts):
        seen.append((rows, texts))
        return [r in (1, 2) for r in rows]

    out = tiny_engine.generate(prompts, images, fixed, EarlyCheck(4, check))
    assert seen == [([0, 1, 2, 3], first4)]  # once, at 4 tokens, with the text so far
    assert out == [full[0], first4[1], first4[2], full[3]]
    # a check that flags nothing changes nothing
    assert tiny_engine.generate(prompts, images, fixed, EarlyCheck(4, lambda rows, texts: [False] * len(rows))) == full
    with pytest.raises(InvalidRequestError):
        EarlyCheck(0, check)


def test_first_step_runs_like_the_plain_path_and_harvests_its_prefixes(tiny_loaded, sample_image):
    """A sample's first step is one forward pass per token, as without reuse; the prefixes it leaves behind (rows
    left-padded) equal a separate prefill of each prefix."""
    from PIL import Image

    imgs = [[sample_image], [Image.new("RGB", (250, 180), (30, 160, 90))]]
    prompts = [build_prompt("vicuna_v1", "What is this?", 1),
               build_prompt("vicuna_v1", "Describe the picture in great detail, please.", 1)]
    on, off = _engine(tiny_loaded, True), _engine(tiny_loaded, False)
    calls = []
    hook = tiny_loaded.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        answers_on = on.generate(prompts, imgs, P)
        n_on = len(calls)
        assert answers_on == off.generate(prompts, imgs, P)
        n_off = len(calls) - n_on
    finally:
        hook.remove()
    assert n_on == n_off and len(on.prefixes) == 2
    fresh = _engine(tiny_loaded, True)
    encoded = [fresh.encode(p, i) for p, i in zip(prompts, imgs)]
    prefilled = fresh._prefix_entries(encoded)  # prefix-only forward passes
    harvested = [on.prefixes.lookup(on._prefix_key(e)) for e in encoded]
    for a, b in zip(harvested, prefilled):
        assert a is not None and len(a.layers) == len(b.layers)
        for (ka, va), (kb, vb) in zip(a.layers, b.layers):
            assert ka.shape == kb.shape and torch.allclose(ka, kb, atol=1e-5) and torch.allclose(va, vb, atol=1e-5)


def test_streamed_first_step_harvests_its_prefix_for_later_steps(tiny_loaded, sample_image):
    from llava.ecso.prompts import PAPER_PROMPTS

    on, off = _engine(tiny_loaded, True), _engine(tiny_loaded, False)
    prompt = build_prompt("vicuna_v1", "What is this?", 1)
    assert "".join(on.stream(prompt, [sample_image], P)) == off.generate([prompt], [[sample_image]], P)[0]
    assert len(on.prefixes) == 1
    caption = build_prompt("vicuna_v1", PAPER_PROMPTS.fill_caption("What is this?"), 1)
    hits = on.prefixes.hits
    assert on.generate([caption], [[sample_image]], P) == off.generate([caption], [[sample_image]], P)
    assert on.prefixes.hits == hits + 1
