"""Classify image files with an exported model, reading the preprocessing from the model's own metadata.

This is the piece an edge user copies: it needs numpy, Pillow and either
onnxruntime (``.onnx``) or openvino (``.xml``), not torch and not the rest of
this project (only the torch-free modules :mod:`exporters.metadata`, :mod:`exporters.errors`,
:mod:`exporters.sessions`, :mod:`exporters.formats`, :mod:`exporters.preprocess` and :mod:`exporters.files`).
Model files and images are treated as hostile: the metadata is validated against the graph
(:func:`exporters.metadata.validate`) and images are held to a pixel budget (docs/device-inputs.md).

    clf = Classifier("model.onnx")
    for p in clf.classify(["shoe.png"]):
        print(p.label, p.probability)
"""
from __future__ import annotations

import json
import logging
import os

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporters import metadata as md
from exporters import preprocess
from exporters.errors import InputError, printable
from exporters.formats import open_artifact
from exporters.sessions import RuntimeOptions

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    source: str
    index: int
    label: str
    probability: float
    top: list[tuple[str, float]]


class Classifier:
    """An ONNX (onnxruntime) or OpenVINO IR model with the preprocessing its metadata describes."""

    def __init__(self, model_path: str | Path, threads: int | None = None, device: str = "cpu",
                 precision: str | None = "f32", max_pixels: int | None = None):
        """``precision``: OpenVINO's inference precision; f32 is what the export gates verified (None: the
        device's default, e.g. bf16 on CPUs with AMX, which shifts probabilities). ``max_pixels``: the most pixels
        an image may declare (default :func:`exporters.preprocess.pixel_budget` of the model's input size)."""
        self.path = Path(model_path)
        if not self.path.is_file():
            raise InputError(f"model file {printable(self.path)} does not exist")
        if max_pixels is not None and max_pixels < 1:
            raise InputError(f"--max-pixels must be >= 1, got {max_pixels}")
        options = RuntimeOptions(threads=bounded_threads(threads), device=device.lower(), latency=True,
                                 precision=precision)
        self._session = open_artifact(self.path, options)
        self.meta = self._session.metadata
        md.validate(self.meta, self._session.input_shape, self._session.output_shape, str(self.path))
        self.channels, self.height, self.width = self.meta["input_size"]
        self.classes: list[str] = list(self.meta["classes"])
        # artifacts exported before the metadata carried its preprocessing: RGB, no crop (what the runtime did)
        self.preprocessing = self.meta.get("preprocessing") or preprocess.spec(
            color="rgb", crop="none", size=(self.height, self.width), channels=self.channels, mean=self.meta["mean"],
            std=self.meta["std"])
        self.max_pixels = max_pixels or preprocess.pixel_budget(self.height, self.width)

    # ------------------------------------------------------------------ preprocessing
    def load_image(self, path: str | Path) -> np.ndarray:
        """One image file -> C x H x W float32 pixels in [0, 255], prepared as the model's metadata says
        (:mod:`exporters.preprocess`: the same decoding and cropping training used)."""
        p = self.preprocessing
        pixels = preprocess.decode_file(path, p["color"], p["crop"], self.height, self.max_pixels)
        if pixels.shape[-1] == 3 and self.channels == 1:
            raise InputError(f"image {printable(path)} has 3 channels; the model takes 1")
        return preprocess.fit(pixels, (self.height, self.width), self.channels)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """N x C x H x W pixels in [0, 255] -> the model's input."""
        return preprocess.normalize(pixels, self.preprocessing)

    # ------------------------------------------------------------------ inference
    def check_input(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        expected = f"N x {self.channels} x {self.height} x {self.width} (NCHW)"
        if batch.ndim != 4:
            raise InputError(f"input has shape {tuple(batch.shape)}; the model takes {expected}")
        if batch.shape[1] != self.channels:
            raise InputError(f"input has {batch.shape[1]} channels (shape {tuple(batch.shape)}); "
                             f"the model takes {expected}")
        if tuple(batch.shape[2:]) != (self.height, self.width):
            raise InputError(f"input is {batch.shape[2]}x{batch.shape[3]} pixels (shape {tuple(batch.shape)}); "
                             f"the model takes {expected}")
        if batch.shape[0] == 0:
            raise InputError("input batch is empty")
        return np.ascontiguousarray(batch, dtype=np.float32)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw model outputs for an already preprocessed N x C x H x W batch."""
        batch = self.check_input(batch)
        out = np.asarray(self._session.run(batch))
        if out.shape != (len(batch), len(self.classes)):  # a graph whose output width is dynamic
            raise InputError(f"{printable(self.path)} gave outputs of shape {out.shape} for {len(batch)} images; its "
                             f"metadata names {len(self.classes)} classes")
        return out

    def classify(self, images: Sequence[str | Path], top_k: int = 1, batch_size: int = 32,
                 failures: list[tuple[str, str]] | None = None) -> list[Prediction]:
        """Predictions for the image files, in order. With a ``failures`` list, an image that cannot be read is
        recorded there as (file, reason) and the others are still classified; without one it raises."""
        top_k = max(1, min(top_k, len(self.classes)))
        predictions = []
        for start in range(0, len(images), batch_size):
            chunk, pixels = [], []
            for source in images[start:start + batch_size]:
                try:
                    pixels.append(self.load_image(source))
                except InputError as exc:
                    if failures is None:
                        raise
                    failures.append((printable(source), str(exc)))
                    continue
                chunk.append(source)
            if not chunk:
                continue
            probs = _softmax(self.logits(self.normalize(np.stack(pixels))))
            for source, row in zip(chunk, probs):
                order = rank_classes(row)[:top_k]
                top = [(self.classes[i], float(row[i])) for i in order]
                predictions.append(Prediction(str(source), int(order[0]), top[0][0], top[0][1], top))
        return predictions


def format_prediction(p: Prediction, as_json: bool = False) -> str:
    """One image's answer as ``pipeline predict`` and ``python -m exporters predict`` print it."""
    if as_json:
        return json.dumps({"image": p.source, "label": p.label, "index": p.index, "probability": p.probability,
                           "top": p.top})
    others = ", ".join(f"{label} {prob:.3f}" for label, prob in p.top[1:])
    return f"{printable(p.source)}: {printable(p.label)} ({p.probability:.3f})" + (f"  [{printable(others)}]"
                                                                                 if others else "")


def bounded_threads(requested: int | None) -> int | None:
    """``requested`` inference threads, capped at the cores this process may use (saying so when it caps):
    5000 threads would spend minutes starting and thrashing."""
    if requested is None:
        return None
    if requested < 1:
        raise InputError(f"--threads must be >= 1, got {requested}")
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > available:
        log.warning("--threads %d capped at %d: the cores this machine lets the process use", requested, available)
        return available
    return requested


def rank_classes(scores: np.ndarray) -> np.ndarray:
    """Class indices from the highest score down; equal scores in index order (the first is ``argmax``). INT8 models
    give exactly equal logits now and then, and numpy's default sort breaks such ties differently per CPU (x86's
    AVX-512 sort and ARM's picked different classes for the same logits), so the order must be a stable one."""
    return np.argsort(-scores, kind="stable")


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


__all__ = ["Classifier", "InputError", "Prediction", "format_prediction"]
