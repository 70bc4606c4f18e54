"""Bounded caches for what a server sees again and again: prompt embeddings, reference latents and reference
K/V. Each is keyed by content (the exact text, a hash of the prepared pixels, the latents' keys) together with
the identity and dtype of the network that computed it, so a hit returns what the computation would have
returned: never another image's latents because it had the same file name.

A cache holds at most `max_bytes` of tensors, evicts the least recently used entry first, is safe to use from
several threads, and counts hits, misses and bytes. `max_bytes = 0` turns it off. Cached tensors are shared
between requests: nothing downstream may modify them in place (the pipeline never does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

V = TypeVar("V")

MIB = 2**20
DEFAULT_SIZES = {"prompts": 256 * MIB, "latents": 256 * MIB, "reference_kv": 2048 * MIB}


def nbytes(value: Any) -> int:
    """Bytes of every tensor in a value (tensors, tuples, lists, dicts, dataclasses)."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


def content_hash(tensor: Tensor) -> str:
    """A digest of a tensor's values, shape and dtype."""
    data = tensor.detach().contiguous().cpu()
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{tuple(data.shape)}|{data.dtype}|".encode())
    flat = data.reshape(-1)  # 0-d tensors have no byte view
    digest.update(flat.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


class Cache:
    """One bounded LRU cache of tensors."""

    def __init__(self, name: str, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"{name} cache size must be >= 0 bytes, got {max_bytes}")
        self.name, self.max_bytes = name, int(max_bytes)
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._request = threading.local()  # this thread's request tally, while Caches.track runs
        self.hits = self.misses = self.evictions = 0
        self.bytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            tally = getattr(self._request, "tally", None)
            if entry is None:
                self.misses += 1
                if tally is not None:
                    tally["misses"] += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            if tally is not None:
                tally["hits"] += 1
            return entry[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = nbytes(value)
        if size > self.max_bytes:
            return  # larger than the whole cache: not kept
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._entries[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, freed) = self._entries.popitem(last=False)
                self.bytes -= freed
                self.evictions += 1

    def lookup(self, key: Hashable, compute: Callable[[], V]) -> V:
        """The cached value for `key`, else `compute()` (outside the lock), kept."""
        if not self.enabled:
            return compute()
        found = self.get(key)
        if found is not None:
            return found
        value = compute()
        self.put(key, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "entries": len(self._entries),
                "bytes": self.bytes,
                "max_bytes": self.max_bytes,
            }


class Caches:
    """The pipeline's three caches; sizes in bytes by name (`DEFAULT_SIZES`), 0 to turn one off."""

    NAMES = tuple(DEFAULT_SIZES)

    def __init__(self, sizes: dict[str, int] | None = None) -> None:
        sizes = {**DEFAULT_SIZES, **(sizes or {})}
        unknown = set(sizes) - set(DEFAULT_SIZES)
        if unknown:
            raise ValueError(f"unknown caches {sorted(unknown)}; there are {', '.join(self.NAMES)}")
        self.prompts = Cache("prompts", sizes["prompts"])
        self.latents = Cache("latents", sizes["latents"])
        self.reference_kv = Cache("reference_kv", sizes["reference_kv"])

    def __iter__(self):
        return iter((self.prompts, self.latents, self.reference_kv))

    def stats(self) -> dict[str, dict[str, int]]:
        return {cache.name: cache.stats() for cache in self}

    @contextlib.contextmanager
    def track(self) -> Iterator[dict[str, dict[str, int]]]:
        """Count this thread's hits and misses per cache (one request's), into the dict it yields."""
        tally = {cache.name: {"hits": 0, "misses": 0} for cache in self}
        for cache in self:
            cache._request.tally = tally[cache.name]
        try:
            yield tally
        finally:
            for cache in self:
                cache._request.tally = None

    def clear(self) -> None:
        for cache in self:
            cache.clear()
