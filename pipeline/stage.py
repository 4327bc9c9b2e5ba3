"""Bookkeeping of one stage's folder inside the run directory.

``STAGE/stage.json`` is written last, atomically, when the stage's outputs
are complete; its ``settings_hash`` tells a rerun whether the finished
outputs still match what was asked for.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pipeline.checkpoint import atomic_write_json, read_json

log = logging.getLogger(__name__)


class Stage:
    def __init__(self, run_dir: Path, name: str):
        self.name = name
        self.dir = Path(run_dir) / name

    @property
    def marker(self) -> Path:
        return self.dir / "stage.json"

    def finished(self, settings_hash: str) -> dict[str, Any] | None:
        """The completion record when the stage finished with these settings and its outputs exist."""
        record = read_json(self.marker)
        if not isinstance(record, dict) or record.get("status") != "complete":
            return None
        if record.get("settings_hash") != settings_hash:
            log.info("%s: finished outputs were made with other settings; rerunning", self.name)
            return None
        if not all((self.dir / out).exists() for out in record.get("outputs", [])):
            log.info("%s: some outputs are missing; rerunning", self.name)
            return None
        return record

    def mark_complete(self, settings_hash: str, outputs: list[str], summary: dict[str, Any]) -> dict[str, Any]:
        record = {"status": "complete", "settings_hash": settings_hash, "outputs": outputs,
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **summary}
        atomic_write_json(self.marker, record)
        return record
