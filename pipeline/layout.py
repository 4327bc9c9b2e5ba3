"""Every path inside a run directory, in one place.

::

    RUN_DIR/config.yaml          the resolved settings of the run (written once per invocation)
    RUN_DIR/manifest.json        what each stage did, with hashes of its inputs and outputs
    RUN_DIR/report.md|json       the report
    RUN_DIR/.lock                held by the command that writes the run directory
    RUN_DIR/.cache/              what libraries would otherwise cache in HOME or TMPDIR (pipeline.caches)
    RUN_DIR/teacher/             teacher stage          (StageFolder)
    RUN_DIR/student/             distill stage: the multi-branch student
    RUN_DIR/baseline/student/    baseline stage: the same student trained alone (a nested run layout)
    RUN_DIR/baseline/METHOD/student/  further baselines (`--baselines none,kd`): the same student with METHOD
    RUN_DIR/fused/               fuse stage
    RUN_DIR/export/              export stage (artifact names: exporters.formats)
    RUN_DIR/bench/               bench stage
    RUN_DIR/report/              report stage: its record and plots

No other module joins these names by hand; stages ask their ``StageFolder`` for
the files they write and read.
"""
from __future__ import annotations

from pathlib import Path


class StageFolder:
    """One stage's folder and the files a stage keeps in it."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        """A file the stage names itself (e.g. an export artifact from :mod:`exporters.formats`)."""
        return self.path / name

    def __repr__(self) -> str:
        return f"StageFolder({str(self.path)!r})"

    @property
    def marker(self) -> Path:
        """``stage.json``: written last, when the stage's outputs are complete."""
        return self.path / "stage.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def model(self) -> Path:
        """``model.pt``: a state dict (trained, multi-branch or fused network)."""
        return self.path / "model.pt"

    @property
    def model_info(self) -> Path:
        """``model.json``: how to rebuild and feed the fused network."""
        return self.path / "model.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def metrics_log(self) -> Path:
        """``metrics.jsonl``: one line per finished epoch."""
        return self.path / "metrics.jsonl"

    @property
    def equivalence(self) -> Path:
        return self.path / "equivalence.json"

    @property
    def int8_report(self) -> Path:
        """``export/int8.json``: the INT8 artifacts' accuracy gate."""
        return self.path / "int8.json"

    @property
    def verify_report(self) -> Path:
        return self.path / "verify.json"

    @property
    def manifest(self) -> Path:
        """``export/manifest.json``: sha256 of every artifact and the metadata they carry."""
        return self.path / "manifest.json"

    @property
    def latency(self) -> Path:
        return self.path / "latency.json"


class RunLayout:
    """The folders and files of one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    def relative(self, path: Path) -> str:
        """``path`` relative to the run directory, with forward slashes (as the manifest records it)."""
        return Path(path).relative_to(self.root).as_posix()

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def lock(self) -> Path:
        """``.lock``: held by the command writing the run directory (pid, host and start inside)."""
        return self.root / ".lock"

    @property
    def cache(self) -> Path:
        """``.cache/``: the libraries' caches (torch inductor, matplotlib), kept inside the run."""
        return self.root / ".cache"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    def folder(self, name: str) -> StageFolder:
        """``RUN_DIR/NAME/``: the folder of a stage that needs no name of its own here."""
        return StageFolder(self.root / name)

    @property
    def teacher(self) -> StageFolder:
        return StageFolder(self.root / "teacher")

    @property
    def student(self) -> StageFolder:
        return StageFolder(self.root / "student")

    @property
    def baseline(self) -> RunLayout:
        """The student trained alone lives in a run layout of its own (its ``student`` folder)."""
        return self.baseline_run("none")

    def baseline_run(self, method: str) -> RunLayout:
        """The run layout of a baseline: ``RUN_DIR/baseline/`` for the student alone, ``RUN_DIR/baseline/METHOD/``
        for a baseline method."""
        return RunLayout(self.root / "baseline") if method == "none" else RunLayout(self.root / "baseline" / method)

    def baseline_runs(self) -> dict[str, RunLayout]:
        """The baselines this run directory holds a finished or started student of, by method."""
        found = {"none": self.baseline} if self.baseline.student.path.is_dir() else {}
        root = self.root / "baseline"
        if root.is_dir():
            found.update({d.name: RunLayout(d) for d in sorted(root.iterdir())
                          if d.is_dir() and d.name != "student" and (d / "student").is_dir()})
        return found

    @property
    def fused(self) -> StageFolder:
        return StageFolder(self.root / "fused")

    @property
    def export(self) -> StageFolder:
        return StageFolder(self.root / "export")

    @property
    def bench(self) -> StageFolder:
        return StageFolder(self.root / "bench")

    @property
    def report(self) -> StageFolder:
        return StageFolder(self.root / "report")
