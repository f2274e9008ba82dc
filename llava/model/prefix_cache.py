"""Reuse of per-sample work across ECSO's steps.

Steps 1-3 of ECSO share the prompt prefix ``system + "USER: " + <576 image tokens>``: :class:`PrefixStore` keeps
the KV cache of that prefix per key (the engine's: prefix tokens, content hashes of the images and, for LLaVA-1.5,
how the images were preprocessed), so the image is encoded and the prefix prefilled once per sample and
preprocessing. Entries hold the tensors themselves; each use builds a fresh ``DynamicCache`` around them, whose
updates concatenate into new tensors, so one step's decoding never mutates another step's prefix.
:class:`PixelMemo` keeps each image's preprocessed pixels so an image is preprocessed once per mode.

Both are bounded by the bytes of the tensors they hold (and a number of entries); they are keyed by content
hashes (:func:`~llava.mm_utils.image_digest`) and never keep a decoded image.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

from llava.mm_utils import image_digest

__all__ = ["DEFAULT_CACHE_BYTES", "PrefixEntry", "PrefixStore", "PixelMemo", "tensor_bytes", "cache_around",
           "generated_cache"]

DEFAULT_CACHE_BYTES = 1 << 30  # per cache (prefix KV, pixels); the worker's --cache-bytes


def tensor_bytes(value: Any) -> int:
    """Bytes held by a tensor, or by the tensors in (nested) lists / tuples / a :class:`PrefixEntry`."""
    if isinstance(value, PrefixEntry):
        return tensor_bytes(value.layers)
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    nbytes = getattr(value, "nbytes", None)
    return int(nbytes) if nbytes is not None else 0


def image_keys(images: Sequence[Any]) -> tuple[bytes, ...]:
    return tuple(image_digest(img) for img in images)


@dataclass
class PrefixEntry:
    key: tuple  # what the prefix is made of (hashable; the engine's: tokens, image content hashes, preprocessing)
    layers: list[tuple[Any, Any]]  # per layer (keys, values), each [1, heads, prefix_len, head_dim]


class _BytesLRU:
    """An LRU of at most ``capacity`` entries and ``max_bytes`` bytes of tensors (an entry larger than that is not
    kept). Thread-safe: a worker runs several model calls at once."""

    def __init__(self, capacity: int, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.capacity = max(0, capacity)
        self.max_bytes = max(0, max_bytes)
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def peek(self, key: Hashable) -> bool:
        """Whether ``get`` would find the item; no effect on statistics or recency."""
        with self._lock:
            return key in self._items

    def put(self, key: Hashable, value: Any) -> None:
        size = tensor_bytes(value)
        if self.capacity == 0 or size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._items[key] = (value, size)
            self.bytes += size
            while len(self._items) > self.capacity or self.bytes > self.max_bytes:
                self.bytes -= self._items.popitem(last=False)[1][1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


class PrefixStore(_BytesLRU):
    def lookup(self, key: tuple) -> PrefixEntry | None:
        return self.get(key)

    def has(self, key: tuple) -> bool:
        return self.peek(key)

    def add(self, entry: PrefixEntry) -> None:
        self.put(entry.key, entry)


class PixelMemo(_BytesLRU):
    def pixels(self, image: Any, mode: str, compute: Callable[[Any, str], Any]) -> Any:
        """``image``'s pixels preprocessed in ``mode`` (``compute(image, mode)`` the first time)."""
        key = (image_digest(image), mode)
        found = self.get(key)
        if found is None:
            found = compute(image, mode)
            self.put(key, found)
        return found


def generated_cache(out: Any) -> Any:
    """The cache a ``generate(..., return_dict_in_generate=True)`` returned (renamed during transformers 5.x)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def cache_around(layers: Sequence[tuple[Any, Any]]):
    """A ``DynamicCache`` holding these (keys, values) per layer without copying them (its updates concatenate
    into new tensors, so they are never written to); the copying constructor where this transformers differs."""
    from transformers import DynamicCache

    try:
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache()
        built = []
        for keys, values in layers:
            layer = DynamicLayer()
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            built.append(layer)
        cache.layers = built
        if cache.get_seq_length() == layers[0][0].shape[-2]:
            return cache
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - other transformers versions
        pass
    return DynamicCache(ddp_cache_data=list(layers))
