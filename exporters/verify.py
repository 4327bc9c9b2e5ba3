"""Check a copied export folder on its own: hashes, metadata, and each model's answers against its reference.

What a device-side user runs before trusting a folder they received
(``pipeline verify EXPORT_DIR``): needs numpy and the runtimes, not torch.

1. every artifact listed in ``manifest.json`` exists with its recorded size and sha256
   (a mismatch is a :class:`GateFailedError`, exit code 3);
2. every model file carries the metadata the manifest records;
3. every model file loads in its runtime and answers the reference inputs of ``reference.npz`` (what each file
   answered at export time, :mod:`exporters.reference`): a float file must give the same top-1 on every image
   (GateFailedError otherwise), an INT8 file that misses its goal is reported, not failed. A folder without
   reference answers (exported before them) gets one batch of random noise per model: finite logits of the
   declared shape, and nothing compared.

The folder may have come over the network, so the manifest is not trusted: a listed path must be a regular file
inside the folder (no ``..``, no absolute path, no link leaving it), a malformed manifest is one line (exit 2), and
a file in the folder that the manifest does not list (a stale INT8 model, a planted external-data file) fails the
check (exit 3) unless it is one of the export stage's own JSON records, which are reported as not checked.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from exporters import metadata as md
from exporters.errors import GateFailedError, InputError, printable
from exporters.files import open_regular
from exporters.formats import format_of, format_names, get_format
from exporters.reference import (
    FLOAT_GOAL,
    REFERENCE,
    Reference,
    compare,
    describe,
    goal_of,
    read_reference,
)
from exporters.sessions import RuntimeOptions

MANIFEST = "manifest.json"
# The export stage's own records beside the artifacts: JSON that no runtime loads, reported as not checked.
RECORDS = (MANIFEST, "stage.json", "equivalence.json", "int8.json", "verify.json")
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # a real one is a few kB
SHA256 = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    """``manifest.json``, checked for the shape verify relies on; anything else is one InputError line."""
    path = Path(folder) / MANIFEST
    try:
        with open_regular(path, "manifest") as handle:
            text = handle.read(MAX_MANIFEST_BYTES + 1)
        if len(text) > MAX_MANIFEST_BYTES:
            raise InputError(f"{printable(path)} is over {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest of this "
                             "pipeline")
        manifest = json.loads(text)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{printable(path)} does not exist: not an export folder (run `pipeline export`)") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{printable(path)} is unreadable: {printable(exc)}") from None
    except RecursionError:
        raise InputError(f"{printable(path)} is unreadable: nested too deeply") from None
    check_manifest(manifest, printable(path))
    return manifest


def check_manifest(manifest: Any, where: str) -> None:
    """The fields verify reads: a non-empty list of artifacts, each a dict with a relative ``path`` (listed once),
    an integer ``bytes`` and a hex ``sha256``; ``metadata`` a dict."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts"), list) or not manifest["artifacts"]:
        raise InputError(f"{where} has no list of artifacts")
    if not isinstance(manifest.get("metadata", {}), dict):
        raise InputError(f"{where}: 'metadata' is not an object")
    seen: set[str] = set()
    for i, entry in enumerate(manifest["artifacts"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise InputError(f"{where}: artifact {i} is not an object with a 'path'")
        name = entry["path"]
        if not relative_inside(name):
            raise InputError(f"{where}: artifact path '{printable(name)}' leaves the folder (absolute, '..', "
                             "empty or not a plain relative path); refusing to read it")
        if name in seen:
            raise InputError(f"{where}: artifact '{printable(name)}' is listed twice")
        seen.add(name)
        size, digest = entry.get("bytes"), entry.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 \
                or not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise InputError(f"{where}: artifact '{printable(name)}' needs 'bytes' (an integer) and 'sha256' "
                             "(64 hex digits)")


def relative_inside(name: str) -> bool:
    """A manifest path that can only name something inside the folder: relative, forward slashes, no ``..``,
    ``.`` or empty parts, no NUL or backslash."""
    parts = name.split("/")
    return bool(name) and not PurePosixPath(name).is_absolute() and "\\" not in name and "\0" not in name \
        and all(part not in ("", ".", "..") for part in parts)


def listed_file(folder: Path, name: str) -> Path:
    """``folder/name`` when it is a regular file whose real path lies inside the folder; InputError otherwise."""
    root = Path(folder).resolve()
    path = root / name
    try:
        real = path.resolve(strict=True)
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise InputError(f"{printable(path)} is listed in {MANIFEST} but does not exist") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a loop of links
        raise InputError(f"{printable(path)} is listed in {MANIFEST} but cannot be read: {printable(exc)}") from None
    if not real.is_relative_to(root):
        raise InputError(f"{printable(path)} is a link that leaves the folder; refusing to read it")
    if not stat.S_ISREG(mode):
        raise InputError(f"{printable(path)} is listed in {MANIFEST} but is not a regular file")
    return real


def check_hashes(folder: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every listed artifact against its recorded size and sha256; raises on the first that differs."""
    rows = []
    for entry in manifest["artifacts"]:
        path = listed_file(folder, entry["path"])
        size, digest = path.stat().st_size, file_sha256(path)
        if size != entry["bytes"] or digest != entry["sha256"]:
            raise GateFailedError(f"{printable(Path(folder) / entry['path'])} does not match {MANIFEST}: sha256 "
                                  f"{digest[:16]}... ({size} bytes), recorded {entry['sha256'][:16]}... "
                                  f"({entry['bytes']} bytes); the file was corrupted or replaced: copy it again or "
                                  "re-export")
        rows.append({"path": entry["path"], "bytes": size, "sha256": digest, "ok": True})
    return rows


def unlisted_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """The export stage's records in the folder (not checked); raises on any other file the manifest does not
    list: a runtime might load it (an ONNX external-data file, a stale INT8 model) although nothing vouches for it."""
    listed = {entry["path"] for entry in manifest["artifacts"]}
    records, others = [], []
    for top, dirs, files in os.walk(folder):  # links are not followed: a linked folder is one unlisted entry
        below = Path(top).relative_to(folder)
        for name in sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(top, d))):
            relative = (below / name).as_posix()
            if relative in listed or relative == MANIFEST:
                continue
            (records if relative in RECORDS else others).append(relative)
    if others:
        shown = ", ".join(printable(name) for name in others[:5]) + (f" and {len(others) - 5} more"
                                                                     if len(others) > 5 else "")
        raise GateFailedError(f"{printable(folder)} holds files that {MANIFEST} does not list: {shown}; a stale or "
                              "planted file (a runtime may load it): remove it, copy the folder again or re-export")
    return records


def model_files(manifest: dict[str, Any]) -> list[str]:
    """The listed files a runtime opens."""
    return [entry["path"] for entry in manifest["artifacts"] if is_model_file(entry["path"])]


def is_model_file(name: str) -> bool:
    """A file a runtime opens (by its format's model-file suffix), as opposed to weights, records or answers."""
    return Path(name).suffix in {Path(get_format(fmt).model_file).suffix for fmt in format_names()}


def model_logits(path: Path, meta: dict[str, Any], inputs: np.ndarray) -> np.ndarray:
    """The model's logits for ``inputs`` (opened as the export's gates and ``predict`` open it: f32 inference
    precision); finite logits of the declared shape, or a GateFailedError."""
    session = format_of(path).open(path, RuntimeOptions(precision="f32"))
    md.validate(meta, session.input_shape, session.output_shape, str(path))
    logits = np.asarray(session.run(inputs))
    expected = (len(inputs), len(meta["classes"]))
    if logits.shape != expected or not np.isfinite(logits).all():
        raise GateFailedError(f"{path}: a {inputs.shape} input gave logits of shape {logits.shape} "
                              f"({'finite' if np.isfinite(logits).all() else 'not finite'}); expected {expected}")
    return logits


def smoke_inference(path: Path, meta: dict[str, Any], batch: int = 2) -> dict[str, Any]:
    """One batch of the declared input shape (random noise) through the model: finite logits of the declared
    shape. All a folder without reference answers allows."""
    shape = (batch, *meta["input_size"])
    logits = model_logits(path, meta, np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    return {"path": str(path), "input_shape": list(shape), "output_shape": list(logits.shape)}


def reference_check(path: Path, name: str, meta: dict[str, Any], reference: Reference, goal: float
                    ) -> dict[str, Any]:
    """The model on the reference inputs, compared with the answers it gave at export time."""
    logits = model_logits(path, meta, reference.inputs)
    agreement = compare(str(path), logits, reference, name, goal)
    return {"path": str(path), "input_shape": list(reference.inputs.shape), "output_shape": list(logits.shape),
            "reference": agreement.as_dict()}


def load_reference(folder: Path, manifest: dict[str, Any]) -> Reference | None:
    """The folder's reference answers when its manifest lists them (hashed already); None for older folders."""
    if not any(entry["path"] == REFERENCE for entry in manifest["artifacts"]):
        return None
    meta = manifest.get("metadata", {})
    size, classes = meta.get("input_size"), meta.get("classes")
    if not isinstance(size, list) or not isinstance(classes, list):
        raise InputError(f"{printable(folder / MANIFEST)}: 'metadata' needs 'input_size' and 'classes' to read "
                         f"{REFERENCE}")
    return read_reference(folder / REFERENCE, size, len(classes))


def read_metadata(fmt: Any, path: Path) -> dict[str, Any]:
    """The metadata a listed model file carries; a file its parser rejects (any error type) is one line."""
    try:
        return fmt.read_metadata(path)
    except InputError:
        raise
    except Exception as exc:  # onnx, protobuf and OpenVINO raise their own types (DecodeError, UnicodeDecodeError...)
        raise InputError(f"cannot read the metadata of {printable(path)}: "
                         f"{printable((str(exc).strip().splitlines() or [type(exc).__name__])[0])}") from None


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # an import hook that refuses it
        return False


def verify_export(folder: str | Path) -> dict[str, Any]:
    """All three checks on an export folder; returns what was checked, raises on the first failure.

    With reference answers (``reference.npz``) each model runs on their inputs: a float file whose top-1 differs
    from its reference on any image fails the folder; an INT8 file below its goal is reported (``met`` false),
    not failed. Without them each model runs once on random noise (shape and finite logits only)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    hashes = check_hashes(folder, manifest)
    records = unlisted_files(folder, manifest)
    opened, unchecked = openable_models(folder, manifest)
    if not opened:
        raise InputError(f"{folder}: no model in {MANIFEST} can be opened here: "
                         + "; ".join(f"{u['path']}: {u['reason']}" for u in unchecked))
    reference = load_reference(folder, manifest)
    listed = {a["path"]: a for a in manifest["artifacts"]}
    models = [smoke_inference(path, meta) if reference is None
              else reference_check(path, name, meta, reference, goal_of(listed[name])) for name, path, meta in opened]
    changed = [row for row in models if "reference" in row and not row["reference"]["met"]
               and row["reference"]["goal"] == FLOAT_GOAL]
    if changed:
        raise GateFailedError("float answers changed on this machine: " + "; ".join(
            f"{row['path']} does not match its reference answers here: {describe(row['reference'])}"
            for row in changed) + "; a float model must give its reference answers everywhere: copy the folder "
            "again, or report the runtime and CPU")
    return {"folder": str(folder), "artifacts": hashes, "models": models, "unchecked": unchecked, "records": records,
            "reference": None if reference is None else {"path": REFERENCE, "images": reference.images},
            "passed": True}


def openable_models(folder: Path, manifest: dict[str, Any]
                    ) -> tuple[list[tuple[str, Path, dict[str, Any]]], list[dict[str, str]]]:
    """(name, path, metadata) of each model file whose runtime is installed here, its metadata checked against the
    manifest's (a difference is a GateFailedError); and the files left unopened, with why."""
    shared_meta = manifest.get("metadata", {})
    listed = {a["path"]: a for a in manifest["artifacts"]}
    opened, unchecked = [], []
    for name in model_files(manifest):
        path = folder / name
        fmt = format_of(path)
        if not installed(fmt.runtime):  # e.g. a device image with ONNX Runtime alone
            unchecked.append({"path": str(path), "reason": f"{fmt.runtime} is not installed here"})
            continue
        own = {"quantization": listed[name]["quantization"]} if "quantization" in listed[name] else {}
        meta, expected_meta = read_metadata(fmt, path), {**shared_meta, **own}
        if meta != expected_meta:
            differing = sorted(k for k in set(meta) | set(expected_meta) if meta.get(k) != expected_meta.get(k))
            raise GateFailedError(f"{path}: its metadata differs from {MANIFEST} in "
                                  f"{printable(', '.join(map(str, differing)))}")
        opened.append((name, path, meta))
    return opened, unchecked


def met_reference(report: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(model files that met their reference answers here, those that did not), relative to the folder."""
    folder = Path(report["folder"])
    rows = [(Path(row["path"]).relative_to(folder).as_posix(), row["reference"]["met"])
            for row in report["models"] if "reference" in row]
    return [name for name, met in rows if met], [name for name, met in rows if not met]


ARCH = re.compile(r"[A-Za-z0-9_.-]{1,32}")  # what platform.machine() names: x86_64, aarch64, arm64, armv7l...


def weights_of(model: str, listed: dict[str, Any]) -> list[str]:
    """The listed files a runtime loads with a model file: an IR's ``.bin``, an ONNX model's ``.onnx.data``."""
    return [name for name in (f"{model}.data", str(PurePosixPath(model).with_suffix(".bin")))
            if name != model and name in listed]


def record_check(folder: str | Path, arch: str, models: list[str] | None = None) -> list[str]:
    """Add ``arch`` to ``checked_on`` of the named model files (every model file when None) and of the weights
    they load, in ``manifest.json``, after those files passed a check on that architecture; returns the paths
    recorded. The files are hashed against the manifest first, so the record names these very bytes; the model
    files are not touched. When the export stage's ``stage.json`` vouches for this manifest (its recorded
    sha256), it is updated to the new one, so the pipeline does not take the record for a damaged output."""
    folder = Path(folder)
    if not isinstance(arch, str) or not ARCH.fullmatch(arch):
        raise InputError(f"'{printable(arch)}' is not a CPU architecture name (e.g. x86_64, aarch64)")
    manifest = read_manifest(folder)
    check_hashes(folder, manifest)
    listed = {entry["path"]: entry for entry in manifest["artifacts"]}
    known = model_files(manifest)
    chosen = known if models is None else list(models)
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise InputError(f"{printable(unknown[0])} is not a model file listed in {printable(folder / MANIFEST)} "
                         f"(listed: {', '.join(map(printable, known))})")
    recorded = list(dict.fromkeys(path for name in chosen for path in (name, *weights_of(name, listed))))
    for path in recorded:
        archs = listed[path].setdefault("checked_on", [])
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise InputError(f"{printable(folder / MANIFEST)}: 'checked_on' of '{printable(path)}' is not a list "
                             "of architecture names")
        if arch not in archs:
            archs.append(arch)
    before = file_sha256(folder / MANIFEST)
    write_json(folder / MANIFEST, manifest)
    follow_stage_record(folder, before, file_sha256(folder / MANIFEST))
    return recorded


def write_json(path: Path, data: Any) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def follow_stage_record(folder: Path, before: str, after: str) -> None:
    """``stage.json`` records the manifest's sha256 as the export stage wrote it; where it still held ``before``
    (the manifest was the stage's own), it now holds ``after``. A record that vouched for another manifest stays."""
    path = folder / "stage.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # a copied folder may carry no record of the stage that made it
    digests = record.get("output_sha256") if isinstance(record, dict) else None
    if isinstance(digests, dict) and digests.get(MANIFEST) == before:
        digests[MANIFEST] = after
        write_json(path, record)


def format_report(report: dict[str, Any], folder: str | Path) -> str:
    """What ``pipeline verify`` and ``python -m exporters verify`` print for a verified folder."""
    lines = [f"ok  {row['path']}  sha256 {row['sha256'][:16]}...  {row['bytes']} bytes" for row in report["artifacts"]]
    lines += [model_line(row) for row in report["models"]]
    lines += [f"--  {row['path']}: sha256 checked; not opened ({row['reason']})" for row in report.get("unchecked", [])]
    lines += [f"--  {name}: a record of the export stage (JSON no runtime loads); not checked"
              for name in report.get("records", [])]
    if not report.get("reference"):
        lines.append(f"--  no reference answers ({REFERENCE}) in this folder: each model ran once on random noise "
                     "(shape and finite logits only), its answers were not compared; re-export to get them")
    return "\n".join(lines + [f"verified: {folder} ({len(report['artifacts'])} files, {len(report['models'])} models)"])


def model_line(row: dict[str, Any]) -> str:
    """One model's line: its agreement with its reference answers, or the shapes of a noise inference."""
    if "reference" not in row:
        return f"ok  {row['path']}: {tuple(row['input_shape'])} -> {tuple(row['output_shape'])} finite logits"
    said = describe(row["reference"])
    return f"ok  {row['path']}: {said}" if row["reference"]["met"] else \
        f"MISS  {row['path']}: does not match its reference answers here: {said}"
