"""Teacher outputs cached per distinct input image and reused across epochs.

The teacher of a distillation is frozen and in eval mode, so its logits and
feature taps for one input image never change. With augmentation ``flip`` or
``none`` a training image reaches the network in at most two versions, so
after the first epochs almost every teacher forward pass would repeat one
already done: :class:`TeacherOutputCache` keeps the outputs and runs the
teacher on the batch's new images only.

Entries are keyed by a digest of the preprocessed input tensor itself (its
bytes), so an entry can never be stale: another image, augmentation, input
size or normalisation gives another key. The same property makes it correct
unchanged under torchrun with sharded samplers (each rank caches the images
it saw). Random crops make nearly every input new, so the distill stage only
turns the cache on for the augmentations in :data:`CACHEABLE_AUGMENTATIONS`.

Memory is bounded (``max_bytes`` per process): once full, new images go to
the live teacher and are not stored. Values are stored in ``float16`` by
default (half the memory; the relative rounding error, ~5e-4, is measured in
``benchmarks/distill_overhead.py``); a value outside float16's range widens
the whole cache to float32. Hits and misses alike return the stored values,
so a given image always yields the same targets.
"""
from __future__ import annotations

import hashlib
import logging
import math
from typing import Callable

import torch

log = logging.getLogger(__name__)

CACHEABLE_AUGMENTATIONS = ("flip", "none")
ENTRY_OVERHEAD_BYTES = 200  # dict slot, key and tensor object of one entry (approximate, counted against the bound)
FLOAT16_MAX = torch.finfo(torch.float16).max

TeacherOutputs = tuple[torch.Tensor, dict[str, torch.Tensor]]
TeacherFn = Callable[[torch.Tensor, list[str]], TeacherOutputs]


def input_digests(images: torch.Tensor) -> list[bytes]:
    """One 16-byte BLAKE2b digest per image of the batch (of its float32 bytes, shape included)."""
    flat = images.detach().to("cpu", torch.float32).contiguous().reshape(len(images), -1)
    shape = repr(tuple(images.shape[1:])).encode()
    rows = flat.view(torch.uint8).numpy()
    return [hashlib.blake2b(row, digest_size=16, salt=b"kdiff-teacher", person=shape[:16]).digest() for row in rows]


class TeacherOutputCache:
    """Teacher logits and named feature taps per distinct input image, bounded in memory.

    Use :meth:`fetch` in place of calling the teacher: it returns exactly what
    ``teacher(images, names)`` returns (float32 logits and NCHW taps), rounded
    through the storage dtype.
    """

    def __init__(self, max_bytes: int, dtype: torch.dtype = torch.float16):
        if dtype not in (torch.float16, torch.float32):
            raise ValueError(f"teacher cache dtype must be float16 or float32 (got {dtype})")
        self.max_bytes = int(max_bytes)
        self.dtype = dtype
        self.entries: dict[bytes, torch.Tensor] = {}
        self.names: tuple[str, ...] | None = None
        self.shapes: list[tuple[int, ...]] = []  # logits first, then each named tap (per image)
        self.bytes_used = 0
        self.hits = self.misses = 0
        self._full_logged = False

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def full(self) -> bool:
        return self.bytes_used >= self.max_bytes

    def stats(self) -> dict[str, float]:
        total = self.hits + self.misses
        return {"entries": len(self.entries), "mb": round(self.bytes_used / 2**20, 1), "hits": self.hits,
                "misses": self.misses, "hit_rate": round(self.hits / total, 4) if total else 0.0,
                "dtype": str(self.dtype).removeprefix("torch.")}

    def describe(self) -> str:
        """``stats()`` as a sentence for the log."""
        s = self.stats()
        return (f"{s['entries']} images ({s['mb']} MB, {s['dtype']}), {s['hits']} hits and {s['misses']} misses "
                f"(hit rate {100 * s['hit_rate']:.1f}%)")

    def reset_counts(self) -> None:
        self.hits = self.misses = 0

    # ----------------------------------------------------------------------------- packing

    def _pack(self, logits: torch.Tensor, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per image, logits and taps flattened into one row (float32, on the CPU)."""
        parts = [logits, *(feats[name] for name in self.names)]
        shapes = [tuple(p.shape[1:]) for p in parts]
        if self.shapes and shapes != self.shapes:  # the teacher's outputs cannot change shape within a run
            raise RuntimeError(f"teacher output shapes changed from {self.shapes} to {shapes}")
        self.shapes = shapes
        return torch.cat([p.detach().float().reshape(len(p), -1) for p in parts], dim=1).cpu()

    def _unpack(self, rows: torch.Tensor) -> TeacherOutputs:
        sizes = [math.prod(s) for s in self.shapes]
        parts = [part.reshape(len(rows), *shape) for part, shape in zip(rows.split(sizes, dim=1), self.shapes)]
        return parts[0], dict(zip(self.names, parts[1:]))

    def _widen(self) -> None:
        log.info("teacher cache: an output exceeds float16's range; storing float32 from now on")
        self.dtype = torch.float32
        self.entries = {key: row.float() for key, row in self.entries.items()}
        self.bytes_used = sum(row.nbytes + ENTRY_OVERHEAD_BYTES for row in self.entries.values())

    def _store(self, key: bytes, row: torch.Tensor) -> None:
        size = row.nbytes + ENTRY_OVERHEAD_BYTES
        if self.bytes_used + size > self.max_bytes:
            if not self._full_logged:
                log.info("teacher cache full (%d images, %.0f MB): new images use the live teacher",
                         len(self.entries), self.bytes_used / 2**20)
                self._full_logged = True
            return
        self.entries[key] = row
        self.bytes_used += size

    # ----------------------------------------------------------------------------- lookup

    def fetch(self, teacher: TeacherFn, images: torch.Tensor, names: list[str]) -> TeacherOutputs:
        """``teacher(images, names)`` for the batch, running ``teacher`` on the images not cached yet."""
        if self.names is None:
            self.names = tuple(names)
        elif tuple(names) != self.names:
            raise ValueError(f"teacher cache holds taps {list(self.names)}, asked for {names}")
        keys = input_digests(images)
        rows: list[torch.Tensor | None] = [self.entries.get(key) for key in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = images if len(missing) == len(keys) else images[torch.tensor(missing, device=images.device)]
            packed = self._pack(*teacher(fresh, list(self.names)))
            if self.dtype == torch.float16 and not bool((packed.abs() <= FLOAT16_MAX).all()):
                self._widen()
            packed = packed.to(self.dtype)
            new: dict[bytes, torch.Tensor] = {}
            for i, row in zip(missing, packed):
                rows[i] = new.setdefault(keys[i], row)  # an image twice in one batch is computed twice, stored once
            for key, row in new.items():
                self._store(key, row)
        # plain tensor bookkeeping: outside the caller's autocast (CPU bf16 autocast refuses float16 inputs)
        with torch.autocast(images.device.type, enabled=False):
            batch = torch.stack([row if row.dtype == self.dtype else row.to(self.dtype) for row in rows])
            return self._unpack(batch.to(images.device, torch.float32))
