"""Check a copied export folder on its own: hashes, metadata, and one inference per model file.

What a device-side user runs before trusting a folder they received
(``pipeline verify EXPORT_DIR``): needs numpy and the runtimes, not torch.

1. every artifact listed in ``manifest.json`` exists with its recorded size and sha256
   (a mismatch is a :class:`GateFailedError`, exit code 3);
2. every model file carries the metadata the manifest records;
3. every model file loads in its runtime and maps a batch of the declared input shape
   to finite logits of the declared shape.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

from exporters.errors import GateFailedError, InputError
from exporters.formats import format_of, format_names, get_format
from exporters.sessions import RuntimeOptions

MANIFEST = "manifest.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} does not exist: not an export folder (run `pipeline export`)") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts"), list):
        raise InputError(f"{path} has no list of artifacts")
    return manifest


def check_hashes(folder: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every listed artifact against its recorded size and sha256; raises on the first that differs."""
    rows = []
    for entry in manifest["artifacts"]:
        path = Path(folder) / entry["path"]
        if not path.is_file():
            raise InputError(f"{path} is listed in {MANIFEST} but does not exist")
        size, digest = path.stat().st_size, file_sha256(path)
        if size != entry.get("bytes") or digest != entry.get("sha256"):
            raise GateFailedError(f"{path} does not match {MANIFEST}: sha256 {digest[:16]}... ({size} bytes), "
                                  f"recorded {str(entry.get('sha256'))[:16]}... ({entry.get('bytes')} bytes); "
                                  "the file was corrupted or replaced: copy it again or re-export")
        rows.append({"path": entry["path"], "bytes": size, "sha256": digest, "ok": True})
    return rows


def model_files(manifest: dict[str, Any]) -> list[str]:
    """The listed files a runtime opens (by their format's model-file suffix)."""
    suffixes = {Path(get_format(name).model_file).suffix for name in format_names()}
    return [entry["path"] for entry in manifest["artifacts"] if Path(entry["path"]).suffix in suffixes]


def smoke_inference(path: Path, meta: dict[str, Any], batch: int = 2) -> dict[str, Any]:
    """One batch of the declared input shape through the model: finite logits of the declared shape."""
    session = format_of(path).open(path, RuntimeOptions(precision="f32"))
    shape = (batch, *(int(v) for v in meta["input_size"]))
    logits = np.asarray(session.run(np.random.default_rng(0).standard_normal(shape, dtype=np.float32)))
    expected = (batch, len(meta["classes"]))
    if logits.shape != expected or not np.isfinite(logits).all():
        raise GateFailedError(f"{path}: a {shape} input gave logits of shape {logits.shape} "
                              f"({'finite' if np.isfinite(logits).all() else 'not finite'}); expected {expected}")
    return {"path": str(path), "input_shape": list(shape), "output_shape": list(logits.shape)}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # an import hook that refuses it
        return False


def verify_export(folder: str | Path) -> dict[str, Any]:
    """All three checks on an export folder; returns what was checked, raises on the first failure."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    hashes = check_hashes(folder, manifest)
    shared_meta = manifest.get("metadata", {})
    own = {a["path"]: {"quantization": a["quantization"]} for a in manifest.get("artifacts", []) if "quantization" in a}
    smoke, unchecked = [], []
    for name in model_files(manifest):
        path = folder / name
        fmt = format_of(path)
        if not installed(fmt.runtime):  # e.g. a device image with ONNX Runtime alone
            unchecked.append({"path": str(path), "reason": f"{fmt.runtime} is not installed here"})
            continue
        meta, expected_meta = fmt.read_metadata(path), {**shared_meta, **own.get(name, {})}
        if meta != expected_meta:
            differing = sorted(k for k in set(meta) | set(expected_meta) if meta.get(k) != expected_meta.get(k))
            raise GateFailedError(f"{path}: its metadata differs from {MANIFEST} in {', '.join(differing)}")
        smoke.append(smoke_inference(path, meta))
    if not smoke:
        raise InputError(f"{folder}: no model in {MANIFEST} can be opened here: "
                         + "; ".join(f"{u['path']}: {u['reason']}" for u in unchecked))
    return {"folder": str(folder), "artifacts": hashes, "models": smoke, "unchecked": unchecked, "passed": True}


def format_report(report: dict[str, Any], folder: str | Path) -> str:
    """What ``pipeline verify`` and ``python -m exporters verify`` print for a verified folder."""
    lines = [f"ok  {row['path']}  sha256 {row['sha256'][:16]}...  {row['bytes']} bytes" for row in report["artifacts"]]
    lines += [f"ok  {row['path']}: {tuple(row['input_shape'])} -> {tuple(row['output_shape'])} finite logits"
              for row in report["models"]]
    lines += [f"--  {row['path']}: sha256 checked; not opened ({row['reason']})" for row in report.get("unchecked", [])]
    return "\n".join(lines + [f"verified: {folder} ({len(report['artifacts'])} files, {len(report['models'])} models)"])
