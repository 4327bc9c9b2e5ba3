"""Shared fixtures: small real data files on disk and a runner for the real `pipeline` CLI."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file (gzip when the name ends in .gz)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def make_stripes(n: int, seed: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 28x28 images that survive crop/flip augmentation: class c is a centred square
    whose brightness grows with c, on noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    images = rng.integers(0, 25, size=(n, 28, 28))
    for i, c in enumerate(labels):
        images[i, 7:21, 7:21] += 20 + (200 // (classes - 1)) * c
    return images.astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture(scope="session")
def stripes_root(tmp_path_factory) -> Path:
    """A Fashion-MNIST-format dataset (gzip IDX files) of 640 train / 200 test stripe images."""
    root = tmp_path_factory.mktemp("stripes")
    for split, n, seed in (("train", 640, 1), ("t10k", 200, 2)):
        images, labels = make_stripes(n, seed)
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    if not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (scripts/bootstrap.sh installs it)")
    return DEBIAN_FASHION


def run_cli(*args: str, env: dict | None = None, timeout: float = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI as a user would, with its exit code, stdout and stderr.

    In this process through click's runner (the suite then imports torch once, not once per command: about 3 s
    a command), or in a subprocess when the test gives another environment or working tree (``env``, ``cwd``)
    or the command reads image folders (their data-loader worker processes install process-wide signal
    handlers in whoever starts them).
    """
    if env is None and cwd is None and not any(a.startswith("imagefolder:") or a == "--workers" for a in args):
        return _run_in_process(args)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or ROOT)


def _run_in_process(args: tuple[str, ...]) -> subprocess.CompletedProcess:
    import traceback

    import torch
    from click.testing import CliRunner

    from pipeline.cli import main

    threads, workdir, on_child = torch.get_num_threads(), os.getcwd(), signal.getsignal(signal.SIGCHLD)
    os.chdir(ROOT)
    try:
        result = CliRunner().invoke(main, list(args), catch_exceptions=True)
    finally:  # what a command may change for the rest of the process
        os.chdir(workdir)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
        signal.signal(signal.SIGCHLD, on_child)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))  # as the interpreter would print it
    return subprocess.CompletedProcess(["pipeline", *args], result.exit_code, result.stdout, stderr)


# Variables that would send a library's files somewhere other than HOME and TMPDIR (a test of what a command
# writes outside its run directory points HOME and TMPDIR at empty folders and leaves these unset).
ELSEWHERE = ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR",
             "TRITON_CACHE_DIR", "CUDA_CACHE_PATH", "ORT_DISABLE_TELEMETRY")


def scratch_env(folder: Path) -> dict[str, str]:
    """The environment of a command whose HOME and TMPDIR are the empty folders ``folder/home`` and
    ``folder/tmp`` (created here), so that a test can see what it wrote outside its run directory."""
    env = {k: v for k, v in os.environ.items() if k not in ELSEWHERE}
    for name in ("home", "tmp"):
        (folder / name).mkdir(exist_ok=True)
    return {**env, "HOME": str(folder / "home"), "TMPDIR": str(folder / "tmp"), "PYTHONUNBUFFERED": "1"}


def run_in_scratch(args: list[str], folder: Path, module: str = "pipeline") -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in a subprocess with HOME and TMPDIR in ``folder`` (``scratch_env``)."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=scratch_env(folder), timeout=600, cwd=ROOT)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, fashion_root) -> Iterator[Path]:
    """One finished `pipeline run --profile tiny` on real Fashion-MNIST (every stage, about a minute), shared by
    every test that needs a whole run directory: clone it (`clone_run`) before changing anything.

    It runs in a subprocess whose HOME and TMPDIR are empty folders beside the run (``home``, ``tmp``: what it
    wrote outside the run directory stays there for a test to see), its output piped as in CI; its stderr is
    kept in ``run.log`` beside the run."""
    def build(folder: Path) -> None:
        result = run_in_scratch(["run", "--profile", "tiny", "--run-dir", str(folder / "run"), "--data-root",
                                 str(fashion_root)], folder)
        (folder / "run.log").write_text(result.stderr)
        assert result.returncode == 0, result.stderr

    with shared_by_workers(tmp_path_factory, "tiny-run", build) as folder:
        yield folder / "run"


@contextlib.contextmanager
def shared_by_workers(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Iterator[Path]:
    """A session-wide folder made once by ``build``. Under pytest-xdist the first worker that needs it builds it,
    under a file lock, in the folder above the workers' own, and the others read it (one copy on disk); pytest
    removes that folder with the run's others."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        with shared_dir(tmp_path_factory, name) as folder:
            build(folder)
            yield folder
        return
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    yield folder


@contextlib.contextmanager
def shared_dir(tmp_path_factory, name: str) -> Iterator[Path]:
    """A folder for a module- or session-wide fixture, removed when the fixture ends (pytest keeps such folders
    otherwise, and a Swin run holds ~0.6 GB)."""
    folder = tmp_path_factory.mktemp(name)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# Small, fast settings for CLI runs on the stripes data.
TINY = ["--subset", "320", "--eval-subset", "100", "--batch-size", "64", "--precision", "fp32", "--no-progress"]


def bench_torch_only(folder: Path, more_settings: str = "") -> list[str]:
    """``--config FILE`` that times torch alone (plus ``more_settings``, YAML lines): for runs whose bench is not
    what the test is about (it spares the bench's exports of the unfused variants for ONNX Runtime and OpenVINO)."""
    config = folder / "bench-torch.yaml"
    config.write_text("bench: {backends: [torch]}\n" + more_settings)
    return ["--config", str(config)]


def train_tiny_teacher(run_dir: Path, data_root: Path, teacher: str) -> Path:
    """A run directory whose teacher stage finished (2 epochs on 320 stripe images)."""
    result = run_cli("teacher", "--teacher", teacher, "--data-root", str(data_root), "--epochs", "2",
                     "--run-dir", str(run_dir), *TINY)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="session")
def stripes_teacher(tmp_path_factory, stripes_root) -> Iterator[Path]:
    """A run directory whose ResNet-34 teacher finished on the stripes (shared by every test and worker: clone it
    before writing into it)."""
    def build(folder: Path) -> None:
        train_tiny_teacher(folder / "run", stripes_root, "resnet34")

    with shared_by_workers(tmp_path_factory, "stripes-teacher", build) as folder:
        yield folder / "run"


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under a folder (to prove nothing was touched), but the run lock (``.lock`` names the
    last command that held the directory)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def kill_when_written(args: list[str], path: Path, cwd: Path = ROOT, timeout: float = 300) -> None:
    """Run the CLI (``args`` after ``python -m pipeline``) and SIGKILL it, with its children, as soon as ``path``
    exists: a crash at the worst moment, right after a checkpoint."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if not path.exists():
        detail = proc.stderr.read().decode() if proc.poll() is not None else f"not written in {timeout:.0f} s"
        proc.kill()
        raise AssertionError(f"{path} was never written before the kill: {detail}")
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the command finished before it could be killed"


def clone_run(source: Path, dest: Path) -> Path:
    """A copy of a run directory whose files are hard links to the original's: instant and no extra disk (a Swin
    run holds ~0.6 GB of checkpoints). The pipeline replaces files (write, then rename) and never writes into
    one, so the original stays as it was; a test that edits a file in place unlinks it first. The run lock is the
    exception: the pipeline writes it in place and locks its inode, so each clone gets a file of its own (a command on
    a clone would otherwise rewrite the original's lock file, and clones used at once would lock each other out)."""
    def link_or_copy(src: str, dst: str) -> None:
        if os.path.basename(src) == ".lock":
            shutil.copy2(src, dst)
        else:
            os.link(src, dst)

    shutil.copytree(source, dest, copy_function=link_or_copy)
    return dest


def pytest_configure(config) -> None:
    """Under pytest-xdist (``make test``: a worker per core) each worker gets one core of its own, inherited by its
    subprocesses: the pipeline sizes its thread pools from the usable cores, so the workers never fight over the
    same cores (unpinned, two workers on 2 cores were slower than one process)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[int(worker.removeprefix("gw")) % len(cores)]})
