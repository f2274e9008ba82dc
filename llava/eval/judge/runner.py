"""Running a judge over answer rows: resume, cache, bounded concurrency, append-only judgments, a summary.

Order of work for each answer: already in the judgments file (resume) -> skipped; in the cache -> judged for free;
else sent to the endpoint by one of ``parallel`` worker threads. The main thread alone writes: the reply goes to
the cache first, then the judgment line is appended and flushed, so a kill at any point loses at most the
requests in flight and never judges an answer twice.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import urlsplit

from tqdm import tqdm

from llava.errors import AuthError, BackendError, InvalidRequestError
from llava.eval.judge.grader import grade, load_grader_prompts, verdict_from_payload
from llava.eval.judge.cache import JudgeCache
from llava.eval.judge.client import BudgetExhaustedError, JudgeClient
from llava.eval.judge.config import JudgeConfig
from llava.eval.judge.local import LocalJudgeClient, local_judge
from llava.eval.judge.parsers import Verdict, parse_verdict
from llava.eval.judge.prompts import JudgePromptSet, default_prompt_set, load_prompt_set
from llava.eval.judge.protocols import JudgeTask, build_tasks, grading_for, judge_protocol
from llava.eval.judge.records import JsonlAppender, Judgment, read_judgments

__all__ = ["JudgeRunner", "JudgeSummary", "judge_answers", "load_prompts_for"]

logger = logging.getLogger(__name__)


@dataclass
class JudgeSummary:
    """What one judge run did (written to ``.judge.json`` and printed by the CLI): answers resumed, served from the
    cache and judged; unparseable, failed and pending ids; why it stopped early, if it did; HTTP request counts."""

    total: int = 0
    resumed: int = 0
    from_cache: int = 0
    judged: int = 0
    unparseable: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    aborted: str | None = None
    wall_s: float = 0.0
    requests: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not (self.failed or self.pending or self.aborted)

    def to_dict(self) -> dict[str, Any]:
        rate = self.requests.get("requests", 0) / self.wall_s if self.wall_s > 0 else 0.0
        return {"total": self.total, "resumed": self.resumed, "from_cache": self.from_cache, "judged": self.judged,
                "unparseable": len(self.unparseable), "unparseable_ids": self.unparseable,
                "failed": self.failed, "pending": len(self.pending), "aborted": self.aborted,
                "complete": self.complete, "wall_s": round(self.wall_s, 3), "requests_per_s": round(rate, 3),
                **{f"http_{k}": v for k, v in self.requests.items()}}


def load_prompts_for(config: JudgeConfig) -> JudgePromptSet:
    """A local judge's own prompt; else ``--judge-file`` if given (a grader also takes a plain-text preamble), else
    the project's set (a grader's own file for benchmarks graded against ground truth)."""
    local = local_judge(config.judge_model)
    if local is not None:
        if config.judge_file is not None:
            raise InvalidRequestError(f"--judge-model {local.name} takes no --judge-file (it judges by its own rules)")
        return local.prompt_set()
    grading = grading_for(config.benchmark)
    if grading is None:
        return load_prompt_set(config.judge_file) if config.judge_file else default_prompt_set()
    if config.judge_file:  # a graded benchmark's protocol names one prompt
        return load_grader_prompts(config.judge_file, judge_protocol(config.benchmark).prompt)
    return default_prompt_set(grading.prompt_file)


def _safe_url(url: str | None) -> str | None:
    if not url:
        return url
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"


class JudgeRunner:
    def __init__(self, config: JudgeConfig, *, client: JudgeClient | None = None,
                 prompts: JudgePromptSet | None = None):
        self.config = config
        self.prompts = prompts or load_prompts_for(config)
        self._client = client
        self.local = local_judge(config.judge_model)
        self.summary = JudgeSummary()

    @property
    def client(self) -> JudgeClient | LocalJudgeClient:
        if self._client is None:
            self._client = LocalJudgeClient(self.local) if self.local else JudgeClient(self.config)
        return self._client

    def tasks(self, rows: Iterable[dict[str, Any]]) -> list[JudgeTask]:
        if self.local is not None:
            return build_tasks(rows, benchmark=self.config.benchmark, mode=self.local.mode(self.config.mode),
                               prompts=self.prompts, judge_model=self.config.judge_model, params={},
                               answer_field=self.config.answer_field)
        grading, path = grading_for(self.config.benchmark), self.config.ground_truth
        if grading is not None and path is None:
            raise InvalidRequestError(f"{self.config.benchmark} grading needs --ground-truth "
                                      f"{grading.ground_truth_file}")
        gt = grading.load_ground_truth(path) if grading is not None else None
        return build_tasks(rows, benchmark=self.config.benchmark, mode=self.config.mode, prompts=self.prompts,
                           judge_model=self.config.judge_model, params=self.config.params(),
                           answer_field=self.config.answer_field, ground_truth=gt)

    def _existing(self, tasks: list[JudgeTask]) -> dict[str, Judgment]:
        """Judgments a previous run of this configuration already wrote (for these answers)."""
        path = self.config.judgments_path
        if path is None or not path.exists():
            return {}
        done = read_judgments(path)
        prompt_of = {t.id: t.prompt.name for t in tasks}
        for j in done.values():
            if (j.judge_model, j.prompt_set_sha256) != (self.config.judge_model, self.prompts.sha256) or (
                    j.id in prompt_of and j.prompt_name != prompt_of[j.id]):
                raise InvalidRequestError(
                    f"{path} holds a judgment of {j.id!r} by {j.judge_model!r}, prompt set {j.prompt_set_sha256[:12]}, "
                    f"prompt {j.prompt_name!r}; this run uses {self.config.judge_model!r}, {self.prompts.sha256[:12]}, "
                    f"{prompt_of.get(j.id)!r}: choose another --output"
                )
        return {k: v for k, v in done.items() if k in prompt_of}

    def _judgment(self, task: JudgeTask, payload: dict[str, Any], cached: bool) -> Judgment:
        kind = task.prompt.verdict_kind
        verdict: Verdict = verdict_from_payload(payload) if kind == "score01" else parse_verdict(kind, payload["raw"])
        return Judgment(
            id=task.id, prompt_name=task.prompt.name, judge_model=self.config.judge_model, verdict_kind=kind,
            raw=payload["raw"], label=verdict.label, score=verdict.score, parse_error=verdict.error,
            detail=verdict.detail, cached=cached, attempts=0 if cached else payload.get("attempts", 1), key=task.key,
            answer_field=self.config.answer_field, prompt_set_sha256=self.prompts.sha256, fields=task.fields,
        )

    def _ask(self, task: JudgeTask, stop: threading.Event) -> dict[str, Any]:
        if stop.is_set():
            raise BudgetExhaustedError("run stopped before this request")
        try:
            if task.prompt.verdict_kind == "score01":
                return grade(self.client, task, self.config.grader_tries)
            done = self.client.complete(task.messages, **task.params)
        except (AuthError, BudgetExhaustedError):
            stop.set()  # at once, so no other worker starts a request that cannot succeed
            raise
        return {"raw": done.text, "attempts": done.attempts}

    def run(self, rows: Iterable[dict[str, Any]]) -> list[Judgment]:
        """Judge every row; returns judgments (resumed, cached and new) in input order. Answers whose request
        failed or did not fit the budget are left out and listed in ``summary``; ``AuthError`` stops the run."""
        start = time.monotonic()
        tasks = self.tasks(rows)
        results = self._existing(tasks)
        s = self.summary = JudgeSummary(total=len(tasks), resumed=len(results))
        todo = [t for t in tasks if t.id not in results]
        path = self.config.judgments_path
        out = JsonlAppender(path) if path is not None else None
        cache = JudgeCache(None if self.local else self.config.resolved_cache_path)  # a local judge: nothing to save
        try:
            misses = []
            for task in todo:
                payload = cache.get(task.key)
                if payload is None:
                    misses.append(task)
                    continue
                results[task.id] = self._record(self._judgment(task, payload, cached=True), out)
                s.from_cache += 1
            if misses:
                try:
                    _ = self.client  # the key is checked here, before any request
                except AuthError as e:
                    s.aborted, s.pending = str(e), [t.id for t in misses]
                else:
                    self._run_requests(misses, cache, out, results)
        finally:
            cache.close()
            if out is not None:
                out.close()
            s.unparseable = [t.id for t in tasks if t.id in results and not results[t.id].parsed]
            s.wall_s = time.monotonic() - start
            s.requests = self.client.stats.to_dict() if self._client is not None else {"requests": 0}
            self._write_summary()
        if s.aborted:
            raise AuthError(s.aborted)
        return [results[t.id] for t in tasks if t.id in results]

    def _record(self, judgment: Judgment, out: JsonlAppender | None) -> Judgment:
        if not judgment.parsed:
            logger.warning("unparseable verdict for %s (%s): %r", judgment.id, judgment.parse_error, judgment.raw[:200])
        if out is not None:
            out.write(judgment.to_row())
        return judgment

    def _run_requests(self, tasks: list[JudgeTask], cache: JudgeCache, out, results: dict[str, Judgment]) -> None:
        stop = threading.Event()
        workers = 1 if self.local else self.config.parallel
        logger.info("judging %d answers with %s (%s, parallel %d)", len(tasks), self.config.judge_model,
                    "no endpoint" if self.local else "requests to its endpoint", workers)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge")
        futures: dict[Future, JudgeTask] = {pool.submit(self._ask, t, stop): t for t in tasks}
        bar = tqdm(total=len(tasks), desc=f"judge {self.config.judge_model}", unit="ans", disable=None)
        try:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    self._collect(fut, futures[fut], cache, out, results, stop)
                    bar.update(1)
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def _collect(self, fut: Future, task: JudgeTask, cache: JudgeCache, out, results, stop: threading.Event) -> None:
        s = self.summary
        try:
            payload = fut.result()
        except AuthError as e:
            if not stop.is_set():
                logger.error("stopping the run: %s", e)
            stop.set()
            s.aborted = s.aborted or str(e)
            s.pending.append(task.id)
            return
        except BudgetExhaustedError:
            stop.set()
            s.pending.append(task.id)
            return
        except BackendError as e:
            s.failed[task.id] = str(e)
            logger.warning("no judgment for %s: %s", task.id, e)
            return
        try:
            cache.put(task.key, self.config.judge_model, task.prompt.name, payload)
        except sqlite3.Error as e:  # e.g. the disk is full: the judgment line below is what counts
            logger.warning("could not cache the judgment of %s: %s", task.id, e)
        results[task.id] = self._record(self._judgment(task, payload, cached=False), out)
        s.judged += 1

    def _write_summary(self) -> None:
        path = self.config.summary_path
        if path is None:
            return
        cfg = self.config.to_dict()
        cfg["base_url"] = _safe_url(cfg.get("base_url"))
        names = sorted({*self.prompts.prompts})
        data = {"config": cfg, "prompt_set": {"source": self.prompts.source, "sha256": self.prompts.sha256,
                                              "names": names},
                "summary": self.summary.to_dict(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = path.with_suffix(".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
            tmp.replace(path)
        except OSError as e:  # e.g. the disk is full: keep the error that stopped the run, if any
            logger.error("cannot write the run summary %s: %s", path, e)
            tmp.unlink(missing_ok=True)


def judge_answers(rows: Iterable[dict[str, Any]], config: JudgeConfig, *, client: JudgeClient | None = None,
                  prompts: JudgePromptSet | None = None) -> list[Judgment]:
    """Library entry point: judge answer rows (dicts in the answer-file format) and return their judgments."""
    return JudgeRunner(config, client=client, prompts=prompts).run(rows)
