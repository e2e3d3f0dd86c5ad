"""Bounded cache of text K/V, keyed by content.

Text K/V depends on the prompt embedding and on the image grid (the text RoPE positions start after the grid), and
the denoiser reads it together with the mask; the key is a hash of all three (values, dtypes and shapes), never an
object identity or a pointer (diffusers' TextKVCacheConfig keys by `data_ptr()`, which a reused buffer can alias).
Entries are evicted least recently used first when their total size passes `max_bytes`.

An evicted handle is only dropped from the cache: a run still holding it keeps it alive, and its memory (device
memory on TensorRT) is freed when the last reference goes.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import threading
from collections.abc import Callable

import numpy as np

from nucleus_runtime.backends.base import TensorHandle

logger = logging.getLogger("nucleus_runtime")

DEFAULT_MAX_BYTES = 4 << 30


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0


def text_kv_key(
    namespace: str, embeddings: np.ndarray, mask: np.ndarray, grid: tuple[int, int]
) -> str:
    """Content hash of what text K/V and its use depend on.

    Args:
        namespace: identifies exactly the bytes that produce and consume an entry (pipeline.cache_namespace), so one cache can serve
            several bundles without mixing their K/V.
        embeddings: [B, T, D] prompt embeddings as fed to the text_kv graph.
        mask: [B, T] mask as fed to the denoiser.
        grid: latent patch grid (rows, cols).
    """
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{namespace}|grid={grid[0]}x{grid[1]}".encode())
    for array in (embeddings, mask):
        array = np.ascontiguousarray(array)
        digest.update(f"|{array.dtype.str}{array.shape}|".encode())
        digest.update(array.data)
    return digest.hexdigest()


class TextKVCache:
    """LRU cache of `TensorHandle`s bounded by total bytes, with hit/miss counters; thread-safe.

    Args:
        max_bytes: size bound. An entry larger than the bound alone is computed and returned but not kept.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[str, TensorHandle] = collections.OrderedDict()
        self._bytes = 0
        self._stats = CacheStats()
        self._lock = threading.Lock()

    def get_or_compute(self, key: str, compute: Callable[[], TensorHandle]) -> TensorHandle:
        with self._lock:
            handle = self._entries.get(key)
            if handle is not None:
                self._entries.move_to_end(key)
                self._stats.hits += 1
                logger.debug("text K/V cache hit %s", key[:12])
                return handle
            self._stats.misses += 1
        # Computed outside the lock: a concurrent miss on the same key computes twice, which is correct, only slower.
        handle = compute()
        with self._lock:
            if handle.nbytes > self.max_bytes:
                logger.debug("text K/V of %d bytes exceeds the cache bound %d: not kept", handle.nbytes, self.max_bytes)
                return handle
            if key not in self._entries:
                self._entries[key] = handle
                self._bytes += handle.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self._stats.evictions += 1
        return handle

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return dataclasses.replace(self._stats, entries=len(self._entries), bytes=self._bytes)

    def __len__(self) -> int:
        return len(self._entries)
