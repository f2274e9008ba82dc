"""What the ECSO demo does, without the UI: find a worker through the controller, run ECSO on it, run one ECSO step
at a time, and turn the events into the four panels' text. Gradio-free, so it is tested without a browser.

Two ways to reach a model, both through the controller's ``/get_worker_address``:

* **Run ECSO**: the worker's ``/worker_ecso_stream`` (:class:`~llava.serve.protocol.ECSOStreamRequest` in, one
  NUL-framed :class:`~llava.serve.protocol.ECSOEvent` per step out). The worker runs the shared pipeline.
* **Step by step**: the buttons of steps 1, 3 and 4 send one ECSO prompt (from :mod:`llava.ecso.prompts`, templated
  with :func:`llava.conversation.build_prompt`) to the worker's LLaVA ``/worker_generate_stream``. Step 2 sends the
  direct answer to the worker's ECSO stream (``direct``), which runs the harm check of a whole run (P(yes) score in
  ``score`` mode) and is closed after the verdict.
"""
from __future__ import annotations

import contextlib
import hashlib
import html
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from llava.conversation import SeparatorStyle, build_prompt, default_conv_mode, get_conv_template
from llava.ecso.config import ECSOConfig
from llava.ecso.display import RANDOM_WEIGHTS_NOTE, final_line, printable, verdict_line
from llava.ecso.events import ECSOProgress, Step
from llava.ecso.prompts import get_prompt_set
from llava.errors import ECSOError, NoWorkerError
from llava.http_client import ServiceClient, error_from_chunk
from llava.mm_utils import encode_image_base64
from llava.serve.protocol.ecso import ECSO_STREAM_PATH, ERROR_EVENT, ECSOEvent, ECSOOptions, ECSOStreamRequest
from llava.serve.protocol.llava import GenerateStreamRequest

__all__ = [
    "DemoClient",
    "RunState",
    "StepResult",
    "ConversationLog",
    "image_digest",
]

logger = logging.getLogger(__name__)

_STEP_LABELS = {Step.DIRECT: "answer", Step.VERDICT: "harm check", Step.CAPTION: "caption", Step.SAFE: "safe answer"}


def image_digest(image: Image.Image | None) -> str | None:
    """MD5 of the image's pixels (what the conversation log keeps instead of the image)."""
    if image is None:
        return None
    return hashlib.md5(image.convert("RGB").tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------- the state


@dataclass
class StepResult(ECSOProgress):
    """The raw outputs of the steps run so far (the panels show them decorated), the threshold a score was held
    against, and the failure that ended the run."""

    threshold: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunState:
    """One run's progress: the raw results plus the text being streamed into each panel. ``apply`` takes one
    ECSO event; the ``*_panel`` properties, :meth:`badge_html` and :meth:`status` render what the page shows.
    ``has_image`` and ``image_in_safe_step`` say how a safe answer is made; ``model_note`` is shown with the verdict
    (e.g. that the model has random weights); ``notice`` replaces the status line (e.g. "type a query first")."""

    result: StepResult = field(default_factory=StepResult)
    streaming: dict[Step, str] = field(default_factory=dict)
    done: bool = False
    started: bool = False
    whole_run: bool = True  # Run ECSO (steps 3-4 skipped when harmless) vs one step at a time
    has_image: bool = True
    image_in_safe_step: bool = False
    model_note: str | None = None
    notice: str | None = None
    _last_mark: float = field(default_factory=time.perf_counter, repr=False)
    _started: float = field(default_factory=time.perf_counter, repr=False)

    def apply(self, event: ECSOEvent) -> None:
        """Take one event: a delta grows its panel, a finished step sets its result and time."""
        self.started = True
        r = self.result
        if event.is_error:
            r.error = f"error_code {event.error_code}: {event.detail or event.text or 'no detail'}"
            self.done = True
            return
        step_event = event.to_step()
        step = step_event.step
        delta = r.apply(step_event)
        if delta is not None:
            self.streaming[step] = self.streaming.get(step, "") + delta
            return
        now = time.perf_counter()
        if step is Step.FINAL:
            r.timings["total"] = event.elapsed if event.elapsed is not None else now - self._started
            self.done = True
            return
        if event.elapsed is None:  # the step's time as this client saw it
            r.timings[step.value] = now - self._last_mark
        self.streaming.pop(step, None)
        self._last_mark = now

    def fail(self, exc: BaseException) -> None:
        self.result.error = describe_error(exc)
        self.done = True

    # ---- rendering --------------------------------------------------------------------------------------------
    def _text(self, step: Step) -> str:
        value = getattr(self.result, step.value)
        return printable(value if value is not None else self.streaming.get(step, ""))

    @property
    def final_panel(self) -> str:
        """The answer ECSO gives (once the run is done), or the direct answer while only step 1 has run."""
        r = self.result
        if r.final is not None:
            return printable(r.final)
        if not self.whole_run and r.flagged is not None:
            return printable(r.safe if r.flagged and r.safe is not None else r.direct if not r.flagged else "")
        return ""

    def _final_source(self) -> str:
        r = self.result
        return final_line(bool(r.flagged), self.image_in_safe_step, self.has_image)

    def verdict_line(self) -> str:
        """How the verdict was reached: ``P(yes) 0.524 < threshold 0.5: not flagged`` (or the read verdict)."""
        r = self.result
        mode = r.verdict_mode or ("score" if r.harm_score is not None else None)
        return verdict_line(bool(r.flagged), r.harm_score, mode, r.threshold if mode == "score" else None,
                            r.verdict_text, r.verdict_fallback)

    def badge_html(self) -> str:
        """A coloured badge: red when the answer was flagged, green when not; the verdict line and which answer is
        final beside it; the model note (a random-weight model) below."""
        r = self.result
        parts = []
        if r.flagged is not None:
            kind, label = ("flagged", "FLAGGED") if r.flagged else ("clear", "NOT FLAGGED")
            colour = "#c62828" if r.flagged else "#2e7d32"
            parts.append(f'<div class="ecso-verdict ecso-{kind}"><span class="ecso-badge" style="background:{colour};'
                         f'color:#fff;font-weight:700;padding:2px 10px;border-radius:4px">{label}</span> '
                         f'{html.escape(self.verdict_line())}. Final answer: {html.escape(self._final_source())}.'
                         '</div>')
        if self.model_note:
            parts.append(f'<div class="ecso-model-note" style="color:#8a6d00">Note: {html.escape(self.model_note)}.'
                         '</div>')
        return "\n".join(parts)

    @property
    def direct_panel(self) -> str:
        return self._text(Step.DIRECT)

    @property
    def caption_panel(self) -> str:
        return self._text(Step.CAPTION) or self._skipped_note()

    @property
    def safe_panel(self) -> str:
        return self._text(Step.SAFE) or self._skipped_note()

    def _skipped_note(self) -> str:
        if self.whole_run and self.done and self.result.flagged is False and self.result.error is None:
            return "(not run: the answer was judged harmless, so the direct answer stands)"
        return ""

    @property
    def verdict_panel(self) -> str:
        r = self.result
        if r.flagged is None:
            return ""
        if r.flagged:
            head = ("HARMFUL: yes, ECSO answers again " +
                    ("from the caption, without the image" if self.has_image and not self.image_in_safe_step
                     else "from the caption" if self.has_image else "(there is no image to leave out)"))
        else:
            head = "HARMFUL: no, the direct answer stands"
        return f"{head}\n{self.verdict_line()}"

    def status(self) -> str:
        r = self.result
        if self.notice:
            return self.notice
        times = " · ".join(f"{_STEP_LABELS.get(k, k)} {_duration(v)}" for k, v in r.timings.items())
        if r.error:
            return f"**Error.** {r.error}" + (f"\n\nStep times: {times}" if times else "")
        if not self.done:
            if not self.started:
                return ""  # nothing run yet (or cleared)
            running = next(iter(self.streaming), None)
            label = f": {_STEP_LABELS.get(running, running)}" if running else ""
            return f"Running{label} ..." + (f" ({times})" if times else "")
        outcome = ""
        if self.whole_run and r.flagged is not None:
            outcome = (" Flagged: the safe response replaces the direct answer." if r.flagged
                       else " Not flagged: the direct answer is the final answer.")
        return f"Done.{outcome}" + (f" Step times: {times}" if times else "")


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def describe_error(exc: BaseException) -> str:
    """The message a user sees for a failed request: what went wrong and, for our typed errors, the cause."""
    if isinstance(exc, NoWorkerError):
        return f"No model worker is available: {exc}"
    if isinstance(exc, ECSOError):
        return f"{type(exc).__name__}: {exc}"
    return f"unexpected {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------------- the client


class DemoClient:
    """The demo's view of the serving stack: a controller at ``controller_url`` (with ``api_key`` when the stack
    uses one) and the workers it hands out."""

    def __init__(self, controller_url: str, *, api_key: str | None = None, timeout: float = 120.0,
                 conv_mode: str | None = None, defaults: ECSOConfig = ECSOConfig()) -> None:
        self.controller_url = controller_url.rstrip("/")
        self._api_key = api_key
        self._timeout = timeout
        self.conv_mode = conv_mode
        self.defaults = defaults  # what the step-by-step buttons use where the options leave a field out
        self._controller = ServiceClient(self.controller_url, api_key=api_key, timeout=timeout)
        self._workers: dict[str, ServiceClient] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._controller.close()
        with self._lock:
            for client in self._workers.values():
                client.close()
            self._workers.clear()

    # ---- controller -------------------------------------------------------------------------------------------
    def list_models(self, refresh: bool = False) -> list[str]:
        """The models of the live workers; ``refresh`` first makes the controller re-check every worker."""
        if refresh:
            self._controller.post("/refresh_all_workers")
        return list(self._controller.post("/list_models").get("models", []))

    def worker(self, model: str) -> ServiceClient:
        """A client for the worker the controller picks for ``model``; :class:`NoWorkerError` when there is none."""
        if not model:
            raise NoWorkerError(f"no model selected (the controller at {self.controller_url} lists no models: is a "
                                f"worker running?)")
        address = self._controller.post("/get_worker_address", {"model": model}).get("address", "")
        if not address:
            raise NoWorkerError(f"the controller at {self.controller_url} has no worker for model {model!r}")
        with self._lock:
            if address not in self._workers:
                self._workers[address] = ServiceClient(address, api_key=self._api_key, timeout=self._timeout)
            return self._workers[address]

    # ---- Run ECSO ---------------------------------------------------------------------------------------------
    def ecso_stream(self, model: str, image: Image.Image | None, query: str,
                    options: ECSOOptions, direct: str | None = None) -> Iterator[ECSOEvent]:
        """The worker's ECSO events for one image + query (``direct``: check this answer instead of generating
        step 1). Non-event frames (a LLaVA error chunk from a proxy or an older worker) become an ``error`` event,
        so the caller has one kind of thing to show. Closing the generator closes the connection, and the worker
        then stops the run."""
        request = ECSOStreamRequest(model=model, image=encode_image_base64(image) if image is not None else None,
                                    query=query, options=options, direct=direct)
        for frame in self.worker(model).stream(ECSO_STREAM_PATH, request):
            if "event" not in frame:
                err = error_from_chunk(frame) or ECSOError(f"unexpected frame from the worker: {frame!r:.200}")
                yield ECSOEvent(event=ERROR_EVENT, error_code=int(err.error_code) or 1, detail=str(err))
                return
            yield ECSOEvent.model_validate(frame)

    def model_note(self, model: str) -> str | None:
        """What the page should say about ``model``: that it has random weights, when its worker says so."""
        try:
            status = self.worker(model).post("/worker_get_status")
        except ECSOError:
            return None  # the run itself will report what is wrong
        return RANDOM_WEIGHTS_NOTE if status.get("random_weights") else None

    def run_context(self, model: str, image: Image.Image | None, options: ECSOOptions) -> dict[str, Any]:
        """The :class:`RunState` fields that say how this run's answers are made."""
        return {"has_image": image is not None, "model_note": self.model_note(model),
                "image_in_safe_step": bool(_pick(options.image_in_safe_step, self.defaults.image_in_safe_step))}

    # ---- one step at a time -----------------------------------------------------------------------------------
    def _conv_mode(self, worker: ServiceClient) -> str:
        if self.conv_mode:
            return self.conv_mode
        status = worker.post("/worker_get_status")
        return str(status.get("conv_mode") or default_conv_mode(None))

    def generate_stream(self, model: str, text: str, images: list[Image.Image], options: ECSOOptions,
                        max_new_tokens: int | None = None) -> Iterator[str]:
        """One single-turn answer from the worker's LLaVA stream API, as cumulative text without the prompt."""
        worker = self.worker(model)
        conv_mode = self._conv_mode(worker)
        conv = get_conv_template(conv_mode)
        prompt = build_prompt(conv_mode, text, len(images))
        stop = conv.sep if conv.sep_style in (SeparatorStyle.SINGLE, SeparatorStyle.MPT) else conv.sep2
        request = GenerateStreamRequest(
            model=model, prompt=prompt, images=[encode_image_base64(im) for im in images],
            temperature=_pick(options.temperature, self.defaults.temperature),
            top_p=_pick(options.top_p, self.defaults.top_p, 1.0),
            max_new_tokens=max_new_tokens or _pick(options.max_new_tokens, self.defaults.max_new_tokens), stop=stop)
        for chunk in worker.stream("/worker_generate_stream", request):
            err = error_from_chunk(chunk)
            if err is not None:
                raise err
            so_far = str(chunk.get("text", ""))
            yield (so_far[len(prompt):] if so_far.startswith(prompt) else so_far).strip()

    def step_stream(self, step: str, model: str, image: Image.Image | None, query: str, options: ECSOOptions,
                    state: StepResult) -> Iterator[RunState]:
        """Run one ECSO step with the earlier steps' outputs from ``state``; yields the updated run state as text
        arrives. Steps 1, 3 and 4 send their prompt to the worker's LLaVA stream API. Step 2 runs on the worker's
        ECSO stream with the direct answer given, so it is the very harm check of a whole run, P(yes) score
        included; the stream is closed after the verdict."""
        try:
            step = Step(step)
        except ValueError:
            raise ValueError(f"unknown step {step!r}; valid: {', '.join(s.value for s in _STEP_LABELS)}") from None
        prompts = get_prompt_set(_pick(options.prompt_set, self.defaults.prompt_set))
        run = RunState(result=StepResult(**{**state.to_dict(), "timings": dict(state.timings), "error": None}),
                       whole_run=False, started=True, **self.run_context(model, image, options))
        images = [image] if image is not None else []
        if step is Step.VERDICT:
            if state.direct is None:
                raise ValueError("run step 1 first: the harm check needs the direct answer")
            yield self._verdict_step(run, model, image, query, options, state.direct)
            return
        if step is Step.DIRECT:
            text, step_images = query, images
        elif step is Step.CAPTION:
            text, step_images = prompts.fill_caption(query), images
        elif step is Step.SAFE:
            if state.caption is None:
                raise ValueError("run step 3 first: the safe answer needs the caption")
            keep_image = _pick(options.image_in_safe_step, self.defaults.image_in_safe_step)
            text, step_images = prompts.fill_safe(state.caption, query), images if keep_image else []
        else:
            raise ValueError(f"step {step.value!r} is not run on its own; valid: "
                             f"{', '.join(s.value for s in _STEP_LABELS)}")
        run._last_mark = time.perf_counter()
        answer = ""
        for answer in self.generate_stream(model, text, step_images, options):
            run.streaming[step] = answer
            yield run
        run.apply(ECSOEvent(event=step.value, text=answer))
        run.done = True
        yield run

    def _verdict_step(self, run: RunState, model: str, image: Image.Image | None, query: str, options: ECSOOptions,
                      direct: str) -> RunState:
        """Step 2: the worker's ECSO stream checks ``direct``; the stream is closed after the verdict event."""
        run._last_mark = time.perf_counter()
        events = self.ecso_stream(model, image, query, options, direct=direct)
        with contextlib.closing(events):
            for event in events:
                if event.is_error or event.event == Step.VERDICT:
                    run.apply(event)
                    break
            else:
                run.fail(ECSOError("the worker's ECSO stream ended before the verdict"))
        r = run.result
        r.threshold = _pick(options.threshold, self.defaults.threshold) if r.harm_score is not None else None
        run.done = True
        return run


def _pick(*values: Any) -> Any:
    """The first value that is not ``None``."""
    return next((v for v in values if v is not None), None)


# ---------------------------------------------------------------------------------------------- conversation log


class ConversationLog:
    """One JSON line per interaction in ``<log_dir>/<YYYY-MM-DD>-conv.json`` (the seed's file naming): time, kind,
    model, query, image digest, options and every step's output. Client addresses only when ``log_ips``."""

    def __init__(self, log_dir: str | Path | None, log_ips: bool = False) -> None:
        self.log_dir = Path(log_dir) if log_dir else None
        self.log_ips = log_ips
        self._lock = threading.Lock()

    def path(self, when: float | None = None) -> Path | None:
        if self.log_dir is None:
            return None
        return self.log_dir / f"{time.strftime('%Y-%m-%d', time.localtime(when))}-conv.json"

    def write(self, *, kind: str, model: str | None, query: str, image: Image.Image | None,
              options: ECSOOptions, result: StepResult, ip: str | None = None) -> None:
        now = time.time()
        path = self.path(now)
        if path is None:
            return
        row: dict[str, Any] = {
            "tstamp": round(now, 3), "type": kind, "model": model, "query": query,
            "image_md5": image_digest(image), "options": options.model_dump(), "steps": result.to_dict(),
        }
        if self.log_ips and ip:
            row["ip"] = ip
        try:
            with self._lock:
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        except OSError as exc:  # a full disk must not break the demo
            logger.warning("could not write the conversation log %s: %s", path, exc)
