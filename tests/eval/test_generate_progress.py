"""The generation bar moves per step of a batch (not only per finished batch) and says which step runs, with a rate
and an ETA; a real ECSO batch on a recording backend drives it through the runner's answerer."""
import io

from llava.ecso.config import ECSOConfig
from llava.ecso.events import Step, StepEvent
from llava.eval.benchmarks import Sample
from llava.eval.gen.answering import Answerer, PreparedBatch
from llava.eval.gen.progress import GenerationProgress
from tests.ecso.test_pipeline import Recorder


def _bar(total):
    out = io.StringIO()
    return GenerationProgress(total, "mmsafetybench ecso", file=out), out


def test_steps_move_the_bar_and_name_the_next_step():
    progress, out = _bar(4)
    batch = progress.batch(4)
    for i in range(4):
        batch.on_event(StepEvent(Step.DIRECT, i, text="a"))
    assert progress.bar.n == 1.6 and "step=harm check x4" in out.getvalue()
    for i, flagged in enumerate([True, False, True, False]):
        batch.on_event(StepEvent(Step.VERDICT, i, flagged=flagged))
    assert round(progress.bar.n, 6) == 1.6 + 0.1 * 2 + 0.6 * 2 and "step=caption x2" in out.getvalue()
    batch.on_event(StepEvent(Step.CAPTION, 0, delta="x", done=False))  # deltas do not count
    for i in (0, 2):
        batch.on_event(StepEvent(Step.CAPTION, i, text="c"))
    for i in (0, 2):
        batch.on_event(StepEvent(Step.SAFE, i, text="s"))
    assert round(progress.bar.n, 6) == 4.0
    batch.finish(4)
    assert round(progress.bar.n, 6) == 4.0
    text = out.getvalue()
    assert "4.0/4" in text and ("sample/s" in text or "s/sample" in text)
    progress.close()


def test_a_direct_batch_counts_when_answered_and_never_over():
    progress, _ = _bar(4)
    batch = progress.batch(3)
    batch.finish(3)
    again = progress.batch(1)
    for _ in range(3):  # a failed batch retried one by one sends its steps again
        again.on_event(StepEvent(Step.DIRECT, 0, text="a"))
    assert again.credited <= 1
    progress.close()


def test_an_ecso_batch_reports_its_steps_while_it_runs(sample_image):
    seen = []
    progress, _ = _bar(3)

    class Watched(Recorder):
        def generate(self, requests):
            seen.append(round(progress.bar.n, 6))  # where the bar stands when each generation starts
            return super().generate(requests)

    samples = [Sample(id=str(i), image=None, query=q, meta={}, benchmark="mmsafetybench") for i, q in
               enumerate(["a", "b", "c"])]
    answerer = Answerer("ecso", Watched(score=0.9), ECSOConfig(), "tiny")
    batch = progress.batch(3)
    result = answerer.answer(PreparedBatch(samples, [[sample_image]] * 3), on_event=batch.on_event)
    batch.finish(result.attempted)
    assert len(result.rows) == 3 and result.flagged == 3
    assert seen == [0.0, 3 * 0.5, 3 * 0.75]  # direct, then caption after the checks, then the safe answers
    assert round(progress.bar.n, 6) == 3.0
    progress.close()
