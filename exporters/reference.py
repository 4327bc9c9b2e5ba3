"""Reference answers: what each model file of an export answered, on the machine that exported it.

The export stage writes ``reference.npz`` into the export folder (listed and hashed in ``manifest.json`` like the
model files): K held-out images as the input tensor the runtime feeds (``inputs``: float32 N x C x H x W, after
preprocessing) and, per model file, the logits its own runtime gave them (``logits/PATH``) and the top-1 they
imply (``top1/PATH``). ``verify`` runs each model on the same inputs elsewhere and compares: a model file "meets
its reference" when its top-1 agrees on at least the goal's share of the images (float files: all of them, since
float answers must not change across machines; INT8 files: 99.5%, since integer kernels differ between CPUs).

Plain arrays in an uncompressed zip, loaded with ``allow_pickle=False`` (a device reads folders from elsewhere),
written with fixed zip timestamps so that the same answers give the same bytes.
"""
from __future__ import annotations

import io
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporters.errors import InputError, printable

REFERENCE = "reference.npz"
INPUTS = "inputs"
LOGITS, TOP1 = "logits/", "top1/"
FLOAT_GOAL, INT8_GOAL = 100.0, 99.5  # percent top-1 agreement with the file's own reference answers
MAX_IMAGES = 10_000
MAX_BYTES = 512 * 1024 * 1024  # uncompressed; a real one is a few MB
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: no clock in the bytes


def goal_of(artifact: Mapping[str, Any]) -> float:
    """The top-1 agreement (percent) a model file needs: INT8 files (their manifest entry names a quantization)
    may differ on a few images between CPUs, float files on none."""
    return INT8_GOAL if "quantization" in artifact else FLOAT_GOAL


def needed(goal: float, images: int) -> int:
    """The fewest agreeing images that reach ``goal`` percent of ``images`` (99.5% of 32: all 32)."""
    return min(images, math.ceil(goal * images / 100 - 1e-9))


def write_reference(path: Path, inputs: np.ndarray, logits: Mapping[str, np.ndarray]) -> None:
    """``reference.npz`` with ``inputs`` and, per model file, its logits and their top-1; atomically and
    reproducibly (sorted members, fixed timestamps, no compression)."""
    arrays: dict[str, np.ndarray] = {INPUTS: np.ascontiguousarray(inputs, dtype=np.float32)}
    for name, values in logits.items():
        arrays[LOGITS + name] = np.ascontiguousarray(values, dtype=np.float32)
        arrays[TOP1 + name] = values.argmax(1).astype(np.int64)
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_TIME)
            info.external_attr = 0o644 << 16
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, arrays[key], allow_pickle=False)
            archive.writestr(info, buffer.getvalue())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Reference:
    """The reference answers of a folder: the inputs, and per model file its logits and top-1."""

    inputs: np.ndarray
    logits: dict[str, np.ndarray]
    top1: dict[str, np.ndarray]

    @property
    def images(self) -> int:
        return len(self.inputs)


def read_reference(path: Path, input_size: Sequence[int], classes: int) -> Reference:
    """``reference.npz``, checked for what verify relies on (shapes, dtypes, finite values, top-1 that its logits
    imply); anything else is one InputError line."""
    arrays = _load(path)
    where = printable(path)
    inputs = arrays.pop(INPUTS, None)
    if inputs is None or inputs.dtype != np.float32 or inputs.ndim != 4 or list(inputs.shape[1:]) != list(input_size) \
            or not 1 <= len(inputs) <= MAX_IMAGES or not np.isfinite(inputs).all():
        raise InputError(f"{where}: '{INPUTS}' must be 1 to {MAX_IMAGES} finite float32 images of shape "
                         f"{list(input_size)}; re-export the folder")
    logits, top1 = {}, {}
    for key in [k for k in arrays if k.startswith(LOGITS)]:
        name, values = key[len(LOGITS):], arrays[key]
        chosen = arrays.get(TOP1 + name)
        if values.dtype != np.float32 or values.shape != (len(inputs), classes) or not np.isfinite(values).all() \
                or chosen is None or chosen.shape != (len(inputs),) or not np.array_equal(chosen, values.argmax(1)):
            raise InputError(f"{where}: the answers of '{printable(name)}' are not {len(inputs)} x {classes} finite "
                             "float32 logits with the top-1 they imply; re-export the folder")
        logits[name], top1[name] = values, chosen
    return Reference(inputs, logits, top1)


def _load(path: Path) -> dict[str, np.ndarray]:
    """Every array of the archive, refusing pickled objects and archives that unpack past MAX_BYTES."""
    try:
        with zipfile.ZipFile(path) as archive:
            if sum(info.file_size for info in archive.infolist()) > MAX_BYTES:
                raise InputError(f"{printable(path)} unpacks to over {MAX_BYTES >> 20} MiB: not reference answers "
                                 "of this pipeline")
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except InputError:
        raise
    except Exception as exc:  # zipfile, numpy's header parser and pickled objects raise several types
        raise InputError(f"{printable(path)} is unreadable: {printable(exc)}; re-export the folder") from None


@dataclass(frozen=True)
class Agreement:
    """How a model file's answers here compare with its reference answers."""

    path: str
    images: int
    agree: int  # images whose top-1 is the reference's
    goal: float  # percent
    max_abs_diff: float

    @property
    def percent(self) -> float:
        return 100.0 * self.agree / self.images

    @property
    def met(self) -> bool:
        return self.agree >= needed(self.goal, self.images)

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.images, "agree": self.agree, "agreement": self.percent, "goal": self.goal,
                "max_abs_diff": self.max_abs_diff, "met": self.met}


def describe(row: Mapping[str, Any]) -> str:
    """An :class:`Agreement` (as its ``as_dict``) in words."""
    return (f"top-1 agrees with its reference answers on {row['agree']}/{row['images']} images "
            f"({row['agreement']:.1f}%, goal {row['goal']:g}%), max abs logit diff {row['max_abs_diff']:.2e}")


def compare(path: str, logits: np.ndarray, reference: Reference, name: str, goal: float) -> Agreement:
    """This machine's ``logits`` for the reference inputs against the answers recorded for model file ``name``."""
    if name not in reference.logits:
        raise InputError(f"{REFERENCE} holds no reference answers for '{printable(name)}'; re-export the folder")
    agree = int((logits.argmax(1) == reference.top1[name]).sum())
    diff = float(np.abs(logits.astype(np.float64) - reference.logits[name]).max())
    return Agreement(path, reference.images, agree, goal, diff)
