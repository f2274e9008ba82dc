"""ECSO wiring with a recording backend, and end to end on the tiny model."""
import pytest

from llava.ecso.backends import Backend, StepRequest
from llava.ecso.config import ECSOConfig
from llava.ecso.local import LocalBackend
from llava.ecso.pipeline import ECSO, ECSOInput
from llava.ecso.prompts import PAPER_PROMPTS
from llava.errors import ImageError, InvalidRequestError


class Recorder(Backend):
    """Answers from a rule and records every request it gets."""

    name = "recorder"

    def __init__(self, direct="Here is how.", verdict="Yes", caption="A bottle.", safe="I cannot help.",
                 score=0.9, supports_score=True):
        self.answers = {"direct": direct, "verdict": verdict, "caption": caption, "safe": safe}
        self.score = score
        self.supports_score = supports_score
        self.calls: list[tuple[str, list[StepRequest]]] = []

    def _kind(self, r):
        if r.text.startswith("QUERY:"):
            return "verdict"
        if r.text.startswith("REQUEST:"):
            return "caption"
        if r.text.startswith("You are given some hints"):
            return "safe"
        return "direct"

    def generate(self, requests):
        self.calls.append(("generate", list(requests)))
        return [self.answers[self._kind(r)] for r in requests]

    def score_yes_no(self, requests):
        self.calls.append(("score", list(requests)))
        return [self.score] * len(requests)


def _all(rec):
    return [(kind, r) for kind, reqs in rec.calls for r in reqs]


def test_flagged_runs_four_steps_with_exact_prompts(sample_image):
    rec = Recorder()
    res = ECSO(rec, ECSOConfig(verdict="score")).run(sample_image, "How do I make it?")
    kinds = [(k, rec._kind(r)) for k, r in _all(rec)]
    assert kinds == [("generate", "direct"), ("score", "verdict"), ("generate", "caption"), ("generate", "safe")]
    reqs = [r for _, r in _all(rec)]
    assert reqs[0].text == "How do I make it?" and len(reqs[0].images) == 1
    assert reqs[1].text == PAPER_PROMPTS.fill_harm_check("How do I make it?", "Here is how.") and reqs[1].images
    assert reqs[2].text == PAPER_PROMPTS.fill_caption("How do I make it?") and reqs[2].images
    assert reqs[3].text == PAPER_PROMPTS.fill_safe("A bottle.", "How do I make it?")
    assert reqs[3].images == []  # step 4 carries no image by default
    assert res.flagged and res.final == "I cannot help." and res.caption == "A bottle."
    assert res.harm_score == 0.9 and res.direct == "Here is how." and res.safe_answer == "I cannot help."
    assert set(res.timings) == {"direct", "verdict", "caption", "safe"}


def test_not_flagged_stops_after_check(sample_image):
    rec = Recorder(score=0.1)
    res = ECSO(rec).run(sample_image, "What is this?")
    assert [rec._kind(r) for _, r in _all(rec)] == ["direct", "verdict"]
    assert not res.flagged and res.final == "Here is how." and res.caption is None and res.safe_answer is None


def test_image_in_safe_step_switch(sample_image):
    rec = Recorder()
    ECSO(rec, ECSOConfig(image_in_safe_step=True)).run(sample_image, "q")
    assert len(_all(rec)[-1][1].images) == 1


@pytest.mark.parametrize("text,flag", [("Yes", True), ("yes.", True), ("Yes, it is harmful", False), ("No", False)])
def test_exact_verdict_mode(sample_image, text, flag):
    rec = Recorder(verdict=text)
    res = ECSO(rec, ECSOConfig(verdict="exact")).run(sample_image, "q")
    assert res.flagged is flag and res.verdict_text == text and res.harm_score is None
    verdict_req = [r for k, r in _all(rec) if rec._kind(r) == "verdict"][0]
    assert verdict_req.params.max_new_tokens == 16


def test_parse_mode_and_score_fallback_without_logprobs(sample_image):
    rec = Recorder(verdict="Yes, it is harmful", supports_score=False)
    pipe = ECSO(rec, ECSOConfig(verdict="score"))
    res = pipe.run(sample_image, "q")
    assert pipe.verdict_mode == "parse" and res.flagged and res.options["verdict_used"] == "parse"
    # the result says how its verdict was reached: no score, and why the configured mode was not used
    assert res.verdict_mode == "parse" and res.harm_score is None
    assert res.verdict_fallback == "backend 'recorder' cannot score yes/no"
    streamed = [e for e in pipe.stream(sample_image, "q") if e.step == "verdict"][0]
    assert (streamed.verdict_mode, streamed.harm_score, streamed.verdict_fallback) == \
        ("parse", None, "backend 'recorder' cannot score yes/no")
    plain = ECSO(Recorder(), ECSOConfig(verdict="score")).run(sample_image, "q")
    assert plain.verdict_mode == "score" and plain.harm_score == 0.9 and plain.verdict_fallback is None


def test_rows_a_backend_cannot_score_are_parsed_and_say_so(sample_image):
    class Partial(Recorder):
        def score_yes_no(self, requests):
            self.calls.append(("score", list(requests)))
            return [None if "unscorable" in r.text else 0.2 for r in requests]

    rec = Partial(verdict="Yes.")
    items = [ECSOInput("unscorable one", [sample_image]), ECSOInput("fine", [sample_image])]
    odd, fine = ECSO(rec).run_batch(items)
    assert (odd.verdict_mode, odd.harm_score, odd.flagged, odd.verdict_text) == ("parse", None, True, "Yes.")
    assert "neither yes nor no" in odd.verdict_fallback
    assert (fine.verdict_mode, fine.harm_score, fine.flagged, fine.verdict_fallback) == ("score", 0.2, False, None)
    kinds = [(k, rec._kind(r)) for k, r in _all(rec)]
    assert kinds.count(("generate", "verdict")) == 1  # only the unscorable row's verdict is generated
    check = ECSO(Partial(verdict="No")).check([sample_image], "unscorable q", "an answer")
    assert (check.mode, check.score, check.flagged) == ("parse", None, False)


def test_threshold(sample_image):
    assert ECSO(Recorder(score=0.6), ECSOConfig(threshold=0.7)).run(sample_image, "q").flagged is False
    assert ECSO(Recorder(score=0.6), ECSOConfig(threshold=0.5)).run(sample_image, "q").flagged is True


def test_given_direct_answer_skips_step_one(sample_image):
    rec = Recorder()
    res = ECSO(rec).run(sample_image, "q", direct="An old answer.")
    assert [rec._kind(r) for _, r in _all(rec)][0] == "verdict"
    assert res.direct == "An old answer."
    assert rec.calls[0][1][0].text == PAPER_PROMPTS.fill_harm_check("q", "An old answer.")


def test_run_batch_only_flagged_rows_reach_steps_3_4(sample_image):
    class PerRow(Recorder):
        def score_yes_no(self, requests):
            self.calls.append(("score", list(requests)))
            return [0.9 if "bad" in r.text else 0.1 for r in requests]

    rec = PerRow()
    events = []
    items = [ECSOInput("bad one", [sample_image]), ECSOInput("fine", [sample_image]), ECSOInput("bad two", [])]
    res = ECSO(rec).run_batch(items, on_event=events.append)
    assert [r.flagged for r in res] == [True, False, True]
    caption_reqs = [r for k, r in _all(rec) if rec._kind(r) == "caption"]
    assert [r.text for r in caption_reqs] == [PAPER_PROMPTS.fill_caption("bad one"), PAPER_PROMPTS.fill_caption("bad two")]
    assert len(rec.calls) == 4  # one batched call per step
    assert [(e.step, e.index) for e in events if e.step == "final"] == [("final", 0), ("final", 1), ("final", 2)]


def test_batch_items_as_tuples_and_a_single_image(sample_image, tmp_path):
    path = tmp_path / "cat.png"
    sample_image.save(path)
    assert ECSOInput("q", str(path)).images == [str(path)]  # one path, not its characters
    assert ECSOInput("q", sample_image).images == [sample_image] and ECSOInput("q").images == []
    rec = Recorder()
    res = ECSO(rec).run_batch([(str(path), "first"), (sample_image, "second", "An old answer."),
                               ECSOInput("third", [sample_image, str(path)])])
    assert [r.query for r in res] == ["first", "second", "third"] and res[1].direct == "An old answer."
    direct = [r for k, r in _all(rec) if rec._kind(r) == "direct"]
    assert [(r.text, len(r.images)) for r in direct] == [("first", 1), ("third", 2)]
    with pytest.raises(InvalidRequestError, match="an ECSOInput or an \\(image, query"):
        ECSO(rec).run_batch(["just a query"])
    with pytest.raises(InvalidRequestError, match="query must be text"):
        ECSOInput(sample_image, "q")


def test_stream_events_order(sample_image):
    events = list(ECSO(Recorder()).stream(sample_image, "q"))
    done = [e.step for e in events if e.done]
    assert done == ["direct", "verdict", "caption", "safe", "final"]
    assert events[-1].text == "I cannot help." and events[-1].flagged


def test_config_validation():
    with pytest.raises(InvalidRequestError, match="score"):
        ECSOConfig(verdict="maybe")
    with pytest.raises(InvalidRequestError):
        ECSOConfig(threshold=1.5)
    with pytest.raises(InvalidRequestError):
        ECSOConfig(max_new_tokens=0)


def test_bad_image_input_fails_before_generation(tmp_path):
    rec = Recorder()
    with pytest.raises(ImageError, match="not found"):
        ECSO(rec).run(str(tmp_path / "missing.png"), "q")
    assert rec.calls == []


def test_end_to_end_tiny_model_consistent_with_steps(tiny_engine, sample_image):
    backend = LocalBackend(tiny_engine)
    cfg = ECSOConfig(max_new_tokens=12, force_verdict=True)
    res = ECSO(backend, cfg).run(sample_image, "How do I make this at home?")
    params = cfg.params()
    direct = backend.generate([StepRequest("How do I make this at home?", [sample_image], params)])[0]
    caption = backend.generate([StepRequest(PAPER_PROMPTS.fill_caption("How do I make this at home?"),
                                            [sample_image], params)])[0]
    safe = backend.generate([StepRequest(PAPER_PROMPTS.fill_safe(caption, "How do I make this at home?"), [], params)])[0]
    assert (res.direct, res.caption, res.safe_answer, res.final) == (direct, caption, safe, safe)
    assert res.options["model_name"] == "tiny" and res.options["image_aspect_ratio"] == "pad"
    # batched over several samples gives the same rows as one at a time
    items = [ECSOInput(q, [sample_image]) for q in ("a?", "How do I make this at home?", "c d e?")]
    batch = ECSO(backend, cfg).run_batch(items)
    assert batch[1].final == res.final and batch[1].caption == res.caption


def test_speculative_caption_same_results_fewer_phases(tiny_engine, sample_image):
    from PIL import Image

    backend = LocalBackend(tiny_engine)
    items = [ECSOInput("How do I make this at home?", [sample_image]),
             ECSOInput("What is this?", [Image.new("RGB", (200, 120), (10, 200, 30))])]
    for force in (True, False):
        plain = ECSO(backend, ECSOConfig(max_new_tokens=10, force_verdict=force)).run_batch(items)
        spec = ECSO(backend, ECSOConfig(max_new_tokens=10, force_verdict=force, speculative_caption=True)).run_batch(items)
        assert _same_results(plain, spec)
    rec = Recorder()
    ECSO(rec, ECSOConfig(speculative_caption=True)).run(sample_image, "q")
    assert [(k, len(reqs)) for k, reqs in rec.calls] == [("generate", 2), ("score", 1), ("generate", 1)]


def _same_results(a, b, **ignore):
    """Equal results, harm scores within 1e-6: a row's score depends on its batch's composition by ~1e-7 (float32
    matmuls over different padding), which is what the README claims."""
    drop = {"timings": None, "options": None, **ignore}
    da, db = [r.to_dict() | drop for r in a], [r.to_dict() | drop for r in b]
    scores = [(x.pop("harm_score"), y.pop("harm_score")) for x, y in zip(da, db)]
    close = all((s is None) == (t is None) and (s is None or abs(s - t) <= 1e-6) for s, t in scores)
    return da == db and close


def test_early_check_cuts_flagged_direct_answers_and_keeps_benign_ones(tiny_engine, sample_image):
    from PIL import Image

    backend = LocalBackend(tiny_engine)
    items = [ECSOInput("How do I make this at home?", [sample_image]),
             ECSOInput("What is this?", [Image.new("RGB", (200, 120), (10, 200, 30))])]
    base = dict(max_new_tokens=10, min_new_tokens=10)
    # benign: one more check at 3 tokens, same results
    plain = ECSO(backend, ECSOConfig(**base, force_verdict=False)).run_batch(items)
    early = ECSO(backend, ECSOConfig(**base, force_verdict=False, early_check_tokens=3)).run_batch(items)
    assert _same_results(plain, early) and not any(r.early_stopped for r in early)
    # flagged at 3 tokens: the direct answer stops there; caption and safe answer are those of the plain path
    plain = ECSO(backend, ECSOConfig(**base, force_verdict=True)).run_batch(items)
    early = ECSO(backend, ECSOConfig(**base, force_verdict=True, early_check_tokens=3)).run_batch(items)
    first3 = backend.generate([StepRequest(it.query, it.images, ECSOConfig(max_new_tokens=3, min_new_tokens=3).params())
                               for it in items])
    assert [r.direct for r in early] == first3 and all(r.early_stopped and r.flagged for r in early)
    assert _same_results(plain, early, direct=None, early_stopped=None, harm_score=None)  # scored on 3 tokens
    assert early[0].options["early_check_tokens"] == 3 and "early_check_tokens" not in plain[0].options
    # one row per model call: the check's rows map back to the right samples
    one = ECSO(LocalBackend(tiny_engine, max_batch_size=1),
               ECSOConfig(**base, force_verdict=True, early_check_tokens=3)).run_batch(items)
    assert _same_results(early, one, harm_score=None)
    # the exact verdict generates inside the direct step's generation (a nested generate)
    exact = ECSO(backend, ECSOConfig(**base, force_verdict=True, early_check_tokens=3, verdict="exact")).run_batch(items)
    assert [r.direct for r in exact] == first3 and _same_results(early, exact, harm_score=None, verdict_text=None,
                                                                  verdict_mode=None)


def test_early_check_on_a_backend_without_it_checks_whole_answers(sample_image, caplog):
    rec = Recorder()
    with caplog.at_level("WARNING"):
        res = ECSO(rec, ECSOConfig(early_check_tokens=4)).run(sample_image, "q")
    assert "no early check" in caplog.text
    assert [(k, rec._kind(r)) for k, r in _all(rec)][:2] == [("generate", "direct"), ("score", "verdict")]
    assert res.flagged and not res.early_stopped and res.direct == "Here is how."


@pytest.mark.parametrize("answer,checked", [("B", False), ("(c).", False), ("B, because it is bigger", True)])
def test_skip_check_regex_passes_matching_answers_unchecked(sample_image, answer, checked):
    rec = Recorder(direct=answer)
    res = ECSO(rec, ECSOConfig(skip_check_regex=r"\(?[A-Ea-e]\)?\.?")).run(sample_image, "Which one? A, B, C or D")
    assert any(k == "score" for k, _ in rec.calls) == checked
    assert res.flagged == checked
    if not checked:
        assert res.final == answer and res.harm_score is None and res.verdict_text == "(check skipped)"
    # off by default: every answer is checked, as in the paper
    rec = Recorder(direct=answer)
    assert ECSO(rec).run(sample_image, "Which one?").flagged and any(k == "score" for k, _ in rec.calls)


def test_lever_validation_and_recording():
    with pytest.raises(InvalidRequestError, match="early_check_tokens"):
        ECSOConfig(early_check_tokens=-1)
    with pytest.raises(InvalidRequestError, match="regular expression"):
        ECSOConfig(skip_check_regex="(unclosed")
    assert "skip_check_regex" not in ECSOConfig().to_dict()
    assert ECSOConfig(skip_check_regex="A").to_dict()["skip_check_regex"] == "A"


def test_a_streamed_run_adds_up_to_the_batch_result(tiny_engine, sample_image):
    """ECSOResult.from_events over a streamed run's events gives what run_batch returns (forced flag: all steps)."""
    from llava.ecso.events import ECSOResult, Step

    backend = LocalBackend(tiny_engine)
    for force in (True, False):
        ecso = ECSO(backend, ECSOConfig(max_new_tokens=4, force_verdict=force, verdict="exact"))
        batch = ecso.run(sample_image, "How do I make this at home?")
        events = list(ecso.stream(sample_image, "How do I make this at home?"))
        assert [e.step for e in events if e.done] == \
            [Step.DIRECT, Step.VERDICT, *([Step.CAPTION, Step.SAFE] if force else []), Step.FINAL]
        streamed = ECSOResult.from_events(batch.query, events, ecso.verdict_mode, batch.options)
        keys = ("direct", "flagged", "harm_score", "verdict_text", "caption", "safe_answer", "final", "verdict_mode")
        assert {k: getattr(streamed, k) for k in keys} == {k: getattr(batch, k) for k in keys}
        assert set(streamed.timings) == set(batch.timings)


def test_async_runs_take_the_same_steps_as_blocking_ones(sample_image):
    """astream/arun/acheck over an async backend: the same events, result and verdicts as stream/run/check."""
    import asyncio

    from llava.ecso.backends import AsyncBackend

    class AsyncRecorder(Recorder, AsyncBackend):
        async def agenerate(self, requests):
            return self.generate(requests)

        async def astream(self, request):
            for word in self.generate([request])[0].split(" "):
                yield word + " "

        async def ascore_yes_no(self, requests):
            return self.score_yes_no(requests)

        def stream(self, request, should_stop=None):  # the blocking twin of astream
            return (word + " " for word in self.generate([request])[0].split(" "))

    async def collect(pipe):
        events = [e async for e in pipe.astream(sample_image, "q")]
        return events, await pipe.arun(sample_image, "q"), await pipe.acheck([sample_image], "q", "an answer")

    for score, supports in ((0.9, True), (0.1, True), (0.9, False)):
        pipe = ECSO(AsyncRecorder(score=score, supports_score=supports))
        events, result, verdict = asyncio.run(collect(pipe))
        strip = lambda evs: [(e.step, e.text, e.delta, e.flagged, e.harm_score, e.verdict_mode, e.verdict_fallback)
                             for e in evs]
        assert strip(events) == strip(pipe.stream(sample_image, "q"))
        blocking = pipe.run(sample_image, "q")
        keys = ("direct", "flagged", "harm_score", "verdict_text", "caption", "safe_answer", "final", "verdict_mode",
                "verdict_fallback")
        assert {k: getattr(result, k) for k in keys} == {k: getattr(blocking, k) for k in keys}
        assert verdict == pipe.check([sample_image], "q", "an answer")
    with pytest.raises(Exception, match="not async"):
        asyncio.run(collect(ECSO(Recorder())))
