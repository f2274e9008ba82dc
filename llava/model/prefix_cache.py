"""Reuse of per-sample work across ECSO's steps.

Steps 1-3 of ECSO share the prompt prefix ``system + "USER: " + <576 image tokens>``: :class:`PrefixStore` keeps
the KV cache of that prefix per key (the engine's: prefix tokens, image objects and, for LLaVA-1.5, how the images
were preprocessed), so the image is encoded and the prefix prefilled once per sample and preprocessing. Entries hold
the tensors themselves; each use builds a fresh ``DynamicCache`` around them, whose updates concatenate into new
tensors, so one step's decoding never mutates another step's prefix.
:class:`PixelMemo` keeps each image's preprocessed pixels so an image is preprocessed once per mode.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

__all__ = ["PrefixEntry", "PrefixStore", "PixelMemo", "cache_around", "generated_cache"]


@dataclass
class PrefixEntry:
    key: tuple  # what the prefix is made of (hashable; the engine's: tokens, image ids, preprocessing)
    images: tuple[Any, ...]  # the image objects themselves: identity is checked, so a recycled id() never matches
    layers: list[tuple[Any, Any]]  # per layer (keys, values), each [1, heads, prefix_len, head_dim]


class _IdentityLRU:
    """An LRU keyed by a hashable key plus the identity of the objects it was built from. Thread-safe: a worker
    runs several model calls at once."""

    def __init__(self, capacity: int):
        self.capacity = max(0, capacity)
        self._items: OrderedDict[Hashable, tuple[tuple[Any, ...], Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, objects: Sequence[Any]) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or len(item[0]) != len(objects) or any(a is not b for a, b in zip(item[0], objects)):
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[1]

    def peek(self, key: Hashable, objects: Sequence[Any]) -> bool:
        """Whether ``get`` would find the item; no effect on statistics or recency."""
        with self._lock:
            item = self._items.get(key)
            return item is not None and len(item[0]) == len(objects) and all(a is b for a, b in zip(item[0], objects))

    def put(self, key: Hashable, objects: Sequence[Any], value: Any) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = (tuple(objects), value)
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class PrefixStore(_IdentityLRU):
    def lookup(self, key: tuple, images: Sequence[Any]) -> PrefixEntry | None:
        return self.get(key, images)

    def has(self, key: tuple, images: Sequence[Any]) -> bool:
        return self.peek(key, images)

    def add(self, entry: PrefixEntry) -> None:
        self.put(entry.key, entry.images, entry)


class PixelMemo(_IdentityLRU):
    def pixels(self, image: Any, mode: str, compute: Callable[[Any, str], Any]) -> Any:
        """``image``'s pixels preprocessed in ``mode`` (``compute(image, mode)`` the first time)."""
        key = (id(image), mode)
        found = self.get(key, (image,))
        if found is None:
            found = compute(image, mode)
            self.put(key, (image,), found)
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
