"""The typed config of one generation run, built once by the CLI (``llava.eval.generate``) and passed down."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llava.ecso.config import ECSOConfig
from llava.ecso.defenses import defense_names, pipeline_defense_names
from llava.errors import InvalidRequestError
from llava.eval.benchmarks import BenchmarkConfig, get_benchmark
from llava.eval.gen.shards import chunk_bounds
from llava.generation import GenerationParams

__all__ = ["METHODS", "GenerateConfig"]

METHODS = tuple(defense_names())  # llava.ecso.defenses: direct, ecso, ecso-paper, caption-only, adashield-static, ...


@dataclass(frozen=True)
class GenerateConfig:
    """One run: which samples (``benchmark`` + ``data``, then chunk ``chunk_idx`` of ``num_chunks``), how to
    answer them (``method``; decoding and ECSO options in ``ecso``, whose ``params()`` also drive ``direct``), and
    where (``answers_file``, resumed unless ``overwrite``).

    from_answers: ECSO over the direct answers in this file (matched by id) instead of generating step 1.
    batch_size: samples per pipeline call (each ECSO step is batched across them).
    concurrency: batches in flight at once (threads; for remote backends, where requests wait on the network).
    max_errors: abort once this many samples failed in one run for a reason other than their image.
    model_id: the ``model_id`` written to every row (default: the backend's model name).
    """

    benchmark: str
    data: BenchmarkConfig
    answers_file: Path
    method: str = "direct"
    ecso: ECSOConfig = field(default_factory=ECSOConfig)
    batch_size: int = 16
    concurrency: int = 1
    num_chunks: int = 1
    chunk_idx: int = 0
    from_answers: Path | None = None
    force_mismatch: bool = False
    overwrite: bool = False
    max_errors: int = 100
    progress: bool = True
    model_id: str | None = None

    def __post_init__(self) -> None:
        get_benchmark(self.benchmark)
        if self.method not in METHODS:
            raise InvalidRequestError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        for name in ("batch_size", "concurrency", "max_errors"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be at least 1, got {getattr(self, name)}")
        chunk_bounds(0, self.num_chunks, self.chunk_idx)  # validates the pair
        if self.from_answers is not None and not self.uses_pipeline:
            raise InvalidRequestError("--from-answers checks existing direct answers with ECSO: use it with "
                                      f"--method {' or '.join(pipeline_defense_names())}")
        if self.from_answers is not None and Path(self.from_answers).resolve() == Path(self.answers_file).resolve():
            raise InvalidRequestError(f"--from-answers and --answers-file are the same file: {self.answers_file}")

    @property
    def uses_pipeline(self) -> bool:
        """The method runs ECSO's pipeline (its rows carry the verdict, caption, ...)."""
        return self.method in pipeline_defense_names()

    @property
    def decoding(self) -> GenerationParams:
        return self.ecso.params()

    @property
    def strict(self) -> bool:
        return self.data.strict
