"""Atomic writes and weights-only loading of checkpoints, and RNG state capture.

A checkpoint is written to a temporary file in the same folder, flushed to
disk and renamed over the old one, so a crash or SIGKILL at any moment leaves
either the previous good checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporters.verify import file_sha256  # noqa: F401  (re-exported: one sha256 for the run and the artifacts)
from pipeline.errors import BadInputError, StorageError


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_file_mode() -> int:
    """The permissions ``open(path, "w")`` would give a new file under the current umask (0644 under 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename the result onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # an unpredictable name, created exclusively: a planted file or link of the same name is never written through
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, plain_file_mode())  # mkstemp makes 0600; the result reads like any file the user writes
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path: Path) -> None:
    def save(tmp: Path) -> None:
        try:
            with open(tmp, "wb") as handle:  # through a file object, the archive's record names do not depend on the
                torch.save(obj, handle)      # (random) temporary file name: equal tensors give equal bytes
        except RuntimeError as exc:  # torch reports a full disk or a file-size limit as a RuntimeError
            raise StorageError(f"cannot write {path}: {str(exc).strip().splitlines()[0]}; free some space, then "
                               "rerun the same command (finished stages are kept)") from None

    atomic_write(path, save)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def load_checkpoint(path: Path, what: str = "checkpoint", data: bytes | None = None) -> Any:
    """``torch.load(weights_only=True)`` with a one-line error naming a missing or corrupt file. ``data``: the
    file's bytes, already read (and hashed) by the caller, loaded instead of reading the file again."""
    path = Path(path)
    if data is None and not path.is_file():
        raise BadInputError(f"{what} not found: {path}")
    try:
        return torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt archives and unpickling errors have many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInputError(f"corrupt {what} {path}: {first} (delete it to start this stage over)") from None


def load_weights_into(model: torch.nn.Module, path: Path, what: str, described_by: Path) -> torch.nn.Module:
    """Load a saved state dict strictly into a rebuilt model; a mismatch is a BadInputError naming both files."""
    state = load_checkpoint(path, what)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BadInputError(f"{what} {path} does not match {described_by}: {str(exc).splitlines()[0]}") from None
    return model


def read_json(path: Path) -> Any | None:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """All RNG states as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    keys, version, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def settings_digest(settings: Any) -> str:
    """Stable short hash of JSON-able settings (a stage's fingerprint)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
