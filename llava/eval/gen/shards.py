"""How a benchmark is split across processes: LLaVA's contiguous chunks (``--num-chunks/--chunk-idx``), the ranks
that ``accelerate launch``/``torchrun`` start, and the part files each of them writes."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TypeVar

from llava.errors import InvalidRequestError

__all__ = ["chunk_bounds", "select_chunk", "DistributedEnv", "distributed_env", "part_path", "part_paths"]

T = TypeVar("T")


def _check(num_chunks: int, chunk_idx: int) -> None:
    if num_chunks < 1:
        raise InvalidRequestError(f"--num-chunks must be at least 1, got {num_chunks}")
    if not 0 <= chunk_idx < num_chunks:
        raise InvalidRequestError(f"--chunk-idx must be in [0, {num_chunks - 1}] for --num-chunks {num_chunks}, "
                                  f"got {chunk_idx}")


def chunk_bounds(n_items: int, num_chunks: int, chunk_idx: int) -> tuple[int, int]:
    """``[start, end)`` of chunk ``chunk_idx`` as LLaVA's ``get_chunk``: chunks of ``ceil(n / num_chunks)`` items,
    in order, the last one shorter. Where LLaVA raises IndexError (more chunks than there are items to fill them),
    the chunk is empty."""
    _check(num_chunks, chunk_idx)
    size = max(1, math.ceil(n_items / num_chunks))
    start = min(n_items, chunk_idx * size)
    return start, min(n_items, start + size)


def select_chunk(items: Sequence[T], num_chunks: int, chunk_idx: int) -> list[T]:
    start, end = chunk_bounds(len(items), num_chunks, chunk_idx)
    return list(items[start:end])


@dataclass(frozen=True)
class DistributedEnv:
    """The rank of this process among ``world_size`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, as set by
    ``accelerate launch`` and ``torchrun``)."""

    rank: int
    world_size: int
    local_rank: int


def distributed_env(environ: dict[str, str] | None = None) -> DistributedEnv | None:
    """The launcher's ranks, or None for a single process (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``)."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise InvalidRequestError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e})") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise InvalidRequestError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return DistributedEnv(rank, world, local)


def part_path(answers_file: str | Path, num_chunks: int, chunk_idx: int) -> Path:
    """The file rank/chunk ``chunk_idx`` of ``num_chunks`` writes when one command drives every chunk:
    ``answers.jsonl`` -> ``answers.part-0-of-4.jsonl``."""
    _check(num_chunks, chunk_idx)
    out = Path(answers_file)
    return out.with_name(f"{out.stem}.part-{chunk_idx}-of-{num_chunks}{out.suffix or '.jsonl'}")


def part_paths(answers_file: str | Path, num_chunks: int) -> list[Path]:
    return [part_path(answers_file, num_chunks, k) for k in range(num_chunks)]
