"""One generation run: plan the samples (benchmark reader, ``--limit``, chunk), resume from the answer file, answer
the rest in batches (images loaded ahead, ``concurrency`` batches in flight), append each batch as it completes,
and keep the manifest up to date. The model is only loaded when there is something left to answer."""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator

from llava.ecso.backends import Backend
from llava.errors import ECSOError
from llava.eval.benchmarks import Sample, check_images, load_samples
from llava.eval.benchmarks.base import DatasetError
from llava.eval.gen.answering import (DATA_FAILURE_KINDS, Answerer, BatchResult, PreparedBatch, SampleFailure,
                                      load_sample_images)
from llava.eval.gen.answers import AnswerFile, read_answer_rows, sort_in_plan_order
from llava.eval.gen.config import GenerateConfig
from llava.eval.gen.manifest import (MANIFEST_VERSION, ResumeMismatchError, environment, file_digest, ids_digest,
                                     load_manifest, manifest_path, now_iso, write_manifest)
from llava.eval.gen.progress import GenerationProgress
from llava.eval.gen.settings import check_resume, data_settings, model_settings
from llava.eval.gen.shards import chunk_bounds, select_chunk

__all__ = ["TooManyErrorsError", "RunSummary", "plan_samples", "load_direct_answers", "run_generation"]

logger = logging.getLogger(__name__)
BackendFactory = Callable[[], Backend]


class TooManyErrorsError(ECSOError):
    code = "too_many_errors"


@dataclass
class RunSummary:
    answers_file: str
    status: str  # complete | incomplete | interrupted | failed
    planned: int
    answered: int  # planned ids with a row in the file
    done: int  # rows written by this run
    skipped: int  # planned ids already answered when this run started
    missing_images: int
    failures: list[dict[str, str]] = field(default_factory=list)
    flagged: int = 0
    elapsed_s: float = 0.0
    samples_per_s: float | None = None


def plan_samples(config: GenerateConfig) -> list[Sample]:
    """The benchmark's samples after ``--limit``, then this run's chunk (LLaVA's contiguous ceil-sized chunks)."""
    samples = load_samples(config.benchmark, config.data)
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise DatasetError(f"{config.data.question_file}: sample id {s.id!r} occurs twice")
        seen.add(s.id)
    chunk = select_chunk(samples, config.num_chunks, config.chunk_idx)
    if config.num_chunks > 1:
        start, end = chunk_bounds(len(samples), config.num_chunks, config.chunk_idx)
        logger.info("chunk %d of %d: samples %d..%d of %d", config.chunk_idx, config.num_chunks, start, end,
                    len(samples))
    return chunk


def load_direct_answers(config: GenerateConfig, samples: list[Sample]) -> dict[str, str]:
    """id -> direct answer from ``--from-answers`` (an ECSO file gives its ``direct`` field). Refused: a file whose
    manifest says its run is unfinished (unless --force-mismatch), and a row whose query differs from the sample's
    (the file answers other questions: another mode or benchmark)."""
    direct_manifest = load_manifest(manifest_path(config.from_answers))
    status = (direct_manifest or {}).get("status", "complete")
    if status != "complete":
        message = (f"--from-answers {config.from_answers} is {status}: finish that run first (rerun its command), "
                   "or pass --force-mismatch to check the answers it has")
        if not config.force_mismatch:
            raise ResumeMismatchError(message)
        logger.warning("%s", message)
    by_query = {s.id: s.query for s in samples}
    answers: dict[str, str] = {}
    for row in read_answer_rows(config.from_answers):
        if row.get("benchmark", config.benchmark) != config.benchmark:
            raise DatasetError(f"{config.from_answers}: row {row['id']} is a {row['benchmark']!r} answer, "
                               f"this run is {config.benchmark!r}")
        key = str(row["id"])
        if key in by_query and row.get("query", by_query[key]) != by_query[key]:
            raise DatasetError(f"{config.from_answers}: the query of {key!r} differs from the benchmark's "
                               f"({row.get('query')!r} vs {by_query[key]!r}); were the direct answers made "
                               "with another --mode or question file?")
        ecso_row = "unsafe" in row and "direct" in row  # written by an ECSO method: its step 1 is the direct answer
        answers[key] = row["direct"] if ecso_row else row["text"]
    logger.info("%d direct answers read from %s", len(answers), config.from_answers)
    return answers


def _batches(samples: list[Sample], size: int) -> Iterator[list[Sample]]:
    for i in range(0, len(samples), size):
        yield samples[i:i + size]


def _prefetch(pool: ThreadPoolExecutor, fn: Callable[[list[Sample]], PreparedBatch],
              batches: Iterable[list[Sample]], ahead: int) -> Iterator[PreparedBatch]:
    """``fn`` over ``batches`` in ``pool``, in order, at most ``ahead`` batches ahead of the consumer."""
    pending: deque[Future] = deque()
    it = iter(batches)
    for batch in it:
        pending.append(pool.submit(fn, batch))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _execute(answerer: Answerer, batches: Iterable[list[Sample]], concurrency: int,
             progress: GenerationProgress) -> Iterator[BatchResult]:
    """Batch results as they complete (out of order when ``concurrency`` > 1), each step moving ``progress``. On an
    error, batches in flight are abandoned and unstarted ones cancelled."""
    loader = ThreadPoolExecutor(1, thread_name_prefix="ecso-load")
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="ecso-gen") if concurrency > 1 else None

    def answer(batch: PreparedBatch) -> BatchResult:
        tracker = progress.batch(len(batch.samples) + len(batch.failures))
        result = answerer.answer(batch, on_event=tracker.on_event)
        tracker.finish(result.attempted)
        return result

    try:
        prepared = _prefetch(loader, answerer.prepare, batches, ahead=concurrency + 1)
        if pool is None:
            for batch in prepared:
                yield answer(batch)
            return
        inflight: set[Future] = set()
        for batch in prepared:
            inflight.add(pool.submit(answer, batch))
            while len(inflight) >= concurrency:
                done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        while inflight:
            done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
            for f in done:
                yield f.result()
    finally:
        loader.shutdown(wait=True, cancel_futures=True)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class _Run:
    """State of one invocation: the plan, what the file holds, the manifest being kept."""

    def __init__(self, config: GenerateConfig):
        self.config = config
        self.started = now_iso()
        self.t0 = time.perf_counter()
        self.samples = plan_samples(config)
        self.direct: dict[str, str] | None = None
        self.without_direct = 0
        if config.from_answers:
            self.direct = load_direct_answers(config, self.samples)
            kept = [s for s in self.samples if s.id in self.direct]
            if self.samples and not kept:
                raise DatasetError(f"none of the {len(self.samples)} planned samples has a direct answer in "
                                   f"{config.from_answers} (its ids look like {next(iter(self.direct), None)!r}, "
                                   f"this run's like {self.samples[0].id!r}): another benchmark, mode or file?")
            self.without_direct = len(self.samples) - len(kept)
            if self.without_direct:
                logger.warning("%d of the %d planned samples have no direct answer in %s: left out",
                               self.without_direct, len(self.samples), config.from_answers)
            self.samples = kept
        self.plan_ids = [s.id for s in self.samples]
        ok, _ = check_images(self.samples, strict=config.strict)
        self.ok_ids = {s.id for s in ok}
        self.failures: dict[str, SampleFailure] = {}
        self.done = self.flagged = self.skipped = 0
        self.forced: list[str] = []
        self.file_ids: set[str] = set()
        self.generation_s = 0.0  # time spent answering (model loading excluded)

    def todo(self) -> list[Sample]:
        return [s for s in self.samples if s.id in self.ok_ids and s.id not in self.file_ids]

    def missing(self) -> list[Sample]:
        return [s for s in self.samples if s.id not in self.ok_ids and s.id not in self.file_ids]

    def status(self) -> str:
        open_ids = {s.id for s in self.todo()} - {k for k, f in self.failures.items() if f.kind in DATA_FAILURE_KINDS}
        return "complete" if not open_ids else "incomplete"

    def summary(self, status: str) -> RunSummary:
        elapsed = time.perf_counter() - self.t0
        answered = sum(1 for i in self.plan_ids if i in self.file_ids)
        return RunSummary(str(self.config.answers_file), status, len(self.plan_ids), answered, self.done,
                          self.skipped, len(self.missing()), [f.to_dict() for f in self.failures.values()],
                          self.flagged, round(elapsed, 3),
                          round(self.done / self.generation_s, 3) if self.done and self.generation_s else None)

    def manifest(self, old: dict[str, Any] | None, settings: dict[str, Any], status: str) -> dict[str, Any]:
        c = self.config
        s = self.summary(status)
        missing = [{"id": m.id, "kind": "missing_image", "message": f"image not found: {m.image}"}
                   for m in self.missing()]
        record = {"start": self.started, "end": None if status == "running" else now_iso(), "status": status,
                  **{k: getattr(s, k) for k in ("planned", "done", "skipped", "missing_images", "flagged",
                                                "elapsed_s", "samples_per_s")},
                  "errors": len(s.failures), "batch_size": c.batch_size, "concurrency": c.concurrency,
                  "limit": c.data.limit, "forced_mismatch": self.forced, "environment": environment()}
        runs = list(old.get("runs", [])) if old else []
        return {
            "version": MANIFEST_VERSION, "answers_file": str(c.answers_file), "status": status,
            "settings": settings,
            "inputs": {"question_file": str(c.data.question_file), "image_folder": str(c.data.image_folder),
                       "tiny_list": c.data.tiny_list and str(c.data.tiny_list),
                       "gt_file": c.data.gt_file and str(c.data.gt_file),
                       "from_answers": c.from_answers and str(c.from_answers),
                       "from_answers_sha256": file_digest(c.from_answers)},
            "plan": {"count": len(self.plan_ids), "ids_sha256": ids_digest(self.plan_ids),
                     "num_chunks": c.num_chunks, "chunk_idx": c.chunk_idx, "limit": c.data.limit,
                     "without_direct_answer": self.without_direct},
            "counts": {"planned": s.planned, "answered": s.answered, "missing_images": s.missing_images,
                       "errors": len(s.failures)},
            "errors": missing + s.failures,
            "started": runs[0]["start"] if runs else self.started, "updated": now_iso(),
            "runs": runs + [record],
        }


def _loop(run: _Run, answers: AnswerFile, answerer: Answerer, todo: list[Sample]) -> None:
    c = run.config
    errors = 0
    t0 = time.perf_counter()
    progress = GenerationProgress(len(todo), f"{c.benchmark} {c.method}", enabled=c.progress)
    try:
        for result in _execute(answerer, _batches(todo, c.batch_size), c.concurrency, progress):
            answers.append(result.rows)
            run.file_ids.update(str(r["id"]) for r in result.rows)
            run.done += len(result.rows)
            run.flagged += result.flagged
            for failure in result.failures:
                run.failures[failure.id] = failure
                errors += failure.kind not in DATA_FAILURE_KINDS
            run.generation_s = time.perf_counter() - t0
            if c.uses_pipeline or run.failures:
                progress.stats(**({"flagged": run.flagged} if c.uses_pipeline else {}), failed=len(run.failures))
            if errors >= c.max_errors:
                last = next(reversed(run.failures.values()))
                raise TooManyErrorsError(f"{errors} samples failed (last: {last.id}: {last.message}); stopping. "
                                         "Fix the cause and rerun the same command: answered samples are kept, "
                                         "failed ones are retried (or raise --max-errors)")
    finally:
        run.generation_s = time.perf_counter() - t0
        progress.close()


def _log_summary(s: RunSummary) -> None:
    rate = f", {s.samples_per_s:.2f} samples/s" if s.samples_per_s else ""
    logger.info("%s: %s; %d/%d answered (%d now, %d already there), %d missing images, %d failed%s",
                s.answers_file, s.status, s.answered, s.planned, s.done, s.skipped, s.missing_images,
                len(s.failures), rate)
    if s.status != "complete":
        logger.warning("%s is %s: rerun the same command to resume", s.answers_file, s.status)


def _generate(run: _Run, answers: AnswerFile, backend: Backend, old: dict[str, Any] | None, has_rows: bool,
              base_settings: dict[str, Any]) -> RunSummary:
    c = run.config
    if c.concurrency > 1 and backend.name == "local":
        logger.warning("--concurrency %d ignored: the local backend runs one batch at a time (use --batch-size)",
                       c.concurrency)
        c = run.config = replace(c, concurrency=1)
    desc = backend.describe()
    model_id = c.model_id or desc.get("model_name") or desc.get("model") or "unknown"
    answerer = Answerer(c.method, backend, c.ecso, model_id, run.direct, strict=c.strict)
    verdict_used = answerer.pipeline.verdict_mode if answerer.pipeline is not None else None
    settings = {**base_settings, "model": model_settings(backend, verdict_used)}
    run.forced = check_resume(old, has_rows, settings, c, compare_model=True)
    mpath = manifest_path(c.answers_file)
    write_manifest(mpath, run.manifest(old, settings, "running"))
    status = "failed"
    try:
        _loop(run, answers, answerer, run.todo())
        status = run.status()
        if status == "complete":
            sort_in_plan_order(c.answers_file, run.plan_ids)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        try:
            write_manifest(mpath, run.manifest(old, settings, status))
        except OSError as exc:  # e.g. the disk filled up: keep the error that got us here; resuming still works
            logger.error("cannot update the manifest %s: %s", mpath, exc)
        _log_summary(run.summary(status))
    return run.summary(status)


def _still_unreadable(run: _Run, old: dict[str, Any] | None, todo: list[Sample]) -> list[SampleFailure]:
    """When everything left failed to load last time, check those images again without loading the model: the
    failures if they still fail (so a finished run with a corrupt image is a no-op), else []."""
    known = {e["id"] for e in (old or {}).get("errors", []) if e.get("kind") in DATA_FAILURE_KINDS}
    if not todo or not {s.id for s in todo} <= known:
        return []
    batch = load_sample_images(todo, strict=run.config.strict)
    return batch.failures if not batch.samples else []


def _finish_without_model(run: _Run, old: dict[str, Any] | None, has_rows: bool,
                          base_settings: dict[str, Any]) -> RunSummary:
    c = run.config
    run.forced = check_resume(old, has_rows, base_settings, c, compare_model=False)
    settings = {**base_settings, "model": (old or {}).get("settings", {}).get("model")}
    status = run.status()
    if status == "complete" and has_rows:
        sort_in_plan_order(c.answers_file, run.plan_ids)
    write_manifest(manifest_path(c.answers_file), run.manifest(old, settings, status))
    summary = run.summary(status)
    _log_summary(summary)
    return summary


def run_generation(config: GenerateConfig, backend_factory: BackendFactory) -> RunSummary:
    """Answer every planned sample not yet in ``config.answers_file``; see the module docstring.
    ``backend_factory`` is only called when something is left to answer."""
    run = _Run(config)
    mpath = manifest_path(config.answers_file)
    with AnswerFile(config.answers_file) as answers:
        scan = answers.open(overwrite=config.overwrite)
        if config.overwrite:
            mpath.unlink(missing_ok=True)
        run.file_ids = set(scan.ids)
        old = load_manifest(mpath)
        run.skipped = sum(1 for i in run.plan_ids if i in run.file_ids)
        if run.plan_ids and not run.ok_ids and not run.skipped:
            first = run.missing()[0].image
            raise DatasetError(f"none of the {len(run.plan_ids)} planned images exists (first: {first}); is "
                               f"--image-folder ({config.data.image_folder!r}) right?")
        extra = len(run.file_ids - set(run.plan_ids))
        todo = run.todo()
        logger.info("%s: %d planned, %d already answered, %d missing images, %d to do%s", config.answers_file,
                    len(run.plan_ids), run.skipped, len(run.missing()), len(todo),
                    f" ({extra} rows in the file are outside this plan)" if extra else "")
        base_settings = data_settings(config)
        unreadable = _still_unreadable(run, old, todo)
        if not todo or unreadable:
            run.failures.update((f.id, f) for f in unreadable)
            return _finish_without_model(run, old, bool(scan.ids), base_settings)
        backend = backend_factory()
        try:
            return _generate(run, answers, backend, old, bool(scan.ids), base_settings)
        finally:
            backend.close()
