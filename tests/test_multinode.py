"""Two torchrun "nodes" on this machine's loopback: two ``torchrun --nnodes=2 --nproc_per_node=1`` launches that meet
through c10d rendezvous (gloo, CPU), as two machines would; docs/distributed.md shows the same commands.

They share one run directory (as nodes share a file system), except where a test says otherwise. The Swin
teacher has no BatchNorm, so two ranks with half the batch each match one process with the whole batch up to
float rounding (SGD: see tests/test_distributed.py); a run that was killed and resumed matches the uninterrupted
two-node run exactly (the engine's resume is bit-exact and the all-reduce of two ranks is deterministic).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, clone_run, kill_when_written, run_cli, shared_dir

pytestmark = pytest.mark.slow

TORCHRUN = Path(sys.executable).parent / "torchrun"
PARAM_TOLERANCE = 1e-4  # two ranks against one process (tests/test_distributed.py's tolerance)
RESUME_TOLERANCE = 0.0  # a killed and resumed two-node run against the uninterrupted one: bit for bit
# one file of settings for every command, so that `pipeline run` finds the teacher and student stages finished
SETTINGS = """\
seed: 5
data: {subset: 128, eval_subset: 64, image_size: 32, augment: flip}
teacher:
  model: swin
  drop_path: 0
  train: {epochs: 2, batch_size: 32, precision: fp32, optimizer: sgd, lr: 0.05, warmup_epochs: 0}
student:
  m: 2
  train: {epochs: 1, batch_size: 32, precision: fp32, optimizer: sgd, lr: 0.05, warmup_epochs: 0}
baseline: false
fuse: {images: 32}
export: {images: 16, int8: false}
bench: {backends: [torch], batch_sizes: [1], warmup: 1, iterations: 3}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    """One torchrun launch (one "node") and the workers it started."""

    proc: subprocess.Popen
    log: Path
    workers: dict[int, int] = field(default_factory=dict)  # rank -> pid of every worker seen (restarts add more)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def poll_workers(self) -> None:
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                for pid in map(int, (task / "children").read_text().split()):
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    rank = next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)
                    if rank is not None:
                        self.workers[rank] = pid

    def error_lines(self) -> list[str]:
        return [line for line in self.output().splitlines() if line.startswith("error: ")]


@dataclass
class Pair:
    """Two launches of one command; ``settle`` waits for both."""

    nodes: list[Node]
    started: float = field(default_factory=time.monotonic)
    wall_s: float = 0.0

    def worker(self, rank: int, timeout: float = 300) -> int:
        """The pid of the worker that holds ``rank`` now (waits until it exists)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                node.poll_workers()
                if rank in node.workers and Path(f"/proc/{node.workers[rank]}").exists():
                    return node.workers[rank]
            time.sleep(0.1)
        raise AssertionError(f"no worker of rank {rank} after {timeout:.0f} s:\n{self.outputs()}")

    def node_of(self, rank: int) -> Node:
        """The node whose worker held ``rank`` last seen (alive or not)."""
        for node in self.nodes:
            node.poll_workers()
        return next(node for node in self.nodes if rank in node.workers)

    def wait_for(self, ready: Callable[[], bool], what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for node in self.nodes:
                node.poll_workers()
            if time.monotonic() > deadline or all(n.proc.poll() is not None for n in self.nodes):
                raise AssertionError(f"{what} did not happen:\n{self.outputs()}")
            time.sleep(0.05)

    def stall(self, after: str, rank: int, limit: float = 120) -> tuple[Node, float]:
        """SIGSTOP the worker of ``rank`` once a log says ``after``; returns the other node, once it has failed,
        and the seconds it took after the stop."""
        self.wait_for(lambda: after in "".join(n.output() for n in self.nodes), after)
        os.kill(self.worker(rank), signal.SIGSTOP)
        stopped, other = time.monotonic(), self.node_of(1 - rank)
        while other.proc.poll() is None and time.monotonic() - stopped < limit:
            time.sleep(0.1)
        assert other.proc.poll() not in (None, 0), self.outputs()
        return other, time.monotonic() - stopped

    def settle(self, timeout: float = 600) -> list[int]:
        """Both launches' exit codes (each node's workers polled until it ends)."""
        deadline = time.monotonic() + timeout
        while any(n.proc.poll() is None for n in self.nodes) and time.monotonic() < deadline:
            for node in self.nodes:
                node.poll_workers()
            time.sleep(0.1)
        codes = [n.proc.poll() for n in self.nodes]
        assert None not in codes, f"still running after {timeout:.0f} s:\n{self.outputs()}"
        self.wall_s = time.monotonic() - self.started
        return codes

    def outputs(self) -> str:
        return "\n".join(f"--- node {i}:\n{n.output()[-4000:]}" for i, n in enumerate(self.nodes))


@contextlib.contextmanager
def two_nodes(folder: Path, args: list[str], run_dirs: list[Path], *, max_restarts: int = 0,
              env: dict[str, str] | None = None) -> Iterator[Pair]:
    """Launch ``torchrun ... -m pipeline ARGS --run-dir RUN_DIR`` twice (one run directory per node, usually the
    same), rendezvous on a free loopback port. On the way out every process is continued and killed, whatever
    the test did to it."""
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    # a store of its own per round: restarted groups otherwise may read the last round's addresses (docs)
    worker_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                  "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **(env or {})}
    nodes = []
    try:
        for i, run_dir in enumerate(run_dirs):
            log = folder / f"node{i}-{run_id}.log"
            command = [str(TORCHRUN), "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                       f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}", f"--max-restarts={max_restarts}",
                       "--monitor-interval=0.5", "-m", "pipeline", *args, "--run-dir", str(run_dir)]
            with open(log, "wb") as out:
                proc = subprocess.Popen(command, cwd=ROOT, env=worker_env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            nodes.append(Node(proc, log))
        yield Pair(nodes)
    finally:
        for node in nodes:
            node.poll_workers()
            for pid in [*node.workers.values(), -node.proc.pid]:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig) if pid > 0 else os.killpg(-pid, sig)
            node.proc.wait()


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].is_floating_point())


def lock_holder(run_dir: Path) -> int:
    return json.loads((run_dir / ".lock").read_text())["pid"]


def assert_no_torn_files(run_dir: Path) -> None:
    leftovers = [p for p in run_dir.rglob(".*") if p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    last = run_dir / "teacher" / "checkpoints" / "last.pt"
    if last.exists():
        assert torch.load(last, weights_only=True)["format"] == 1  # loads: not torn


@dataclass
class Module:
    """What this module's tests share: the settings, the uninterrupted two-node teacher run and its one-process
    twin."""

    folder: Path
    settings: Path
    args: list[str]  # after the command and its --config
    teacher_dir: Path
    single_dir: Path
    workers: dict[int, int]
    times: dict[str, float]

    def command(self, name: str, settings: Path | None = None) -> list[str]:
        return [name, "--config", str(settings or self.settings), *self.args]


@pytest.fixture(scope="module")
def module(tmp_path_factory, stripes_root) -> Iterator[Module]:
    """One uninterrupted two-node teacher run and the same training in one process."""
    with shared_dir(tmp_path_factory, "multinode") as folder:
        settings = folder / "settings.yaml"
        settings.write_text(SETTINGS)
        args = ["--data-root", str(stripes_root), "--no-progress"]
        teacher_dir, single_dir = folder / "two-nodes", folder / "single"
        with two_nodes(folder, ["teacher", "--config", str(settings), *args], [teacher_dir, teacher_dir]) as pair:
            codes = pair.settle()
            assert codes == [0, 0], pair.outputs()
            workers = {rank: pid for node in pair.nodes for rank, pid in node.workers.items()}
        start = time.monotonic()
        single = run_cli("teacher", "--config", str(settings), *args, "--run-dir", str(single_dir),
                         env={"OMP_NUM_THREADS": "1"})
        assert single.returncode == 0, single.stderr
        yield Module(folder, settings, args, teacher_dir, single_dir, workers,
                     {"two nodes": pair.wall_s, "one process": time.monotonic() - start})


def test_two_nodes_train_the_teacher_as_one_process_does(module):
    ddp = json.loads((module.teacher_dir / "teacher" / "metrics.json").read_text())
    single = json.loads((module.single_dir / "teacher" / "metrics.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["replica_max_abs_diff"] == 0.0  # both nodes end with identical weights
    assert ddp["test_images"] == single["test_images"] == 64  # sharded evaluation, all-reduced once
    diff = max_weight_diff(module.teacher_dir / "teacher" / "model.pt", module.single_dir / "teacher" / "model.pt")
    assert diff <= PARAM_TOLERANCE, f"two-node and one-process weights differ by {diff:.2e}"
    assert lock_holder(module.teacher_dir) == module.workers[0], "rank 0, and only rank 0, holds the run-dir lock"
    assert not (module.teacher_dir / ".rank0-token").exists()
    print(f"two nodes {module.times['two nodes']:.0f} s, one process {module.times['one process']:.0f} s; "
          f"max |w_2nodes - w_single| = {diff:.2e}")


def kill_after_first_epoch(pair: Pair, run_dir: Path, rank: int) -> None:
    """SIGKILL the worker of ``rank`` a second into epoch 2 (epoch 1's checkpoint is on disk by then)."""
    history = run_dir / "teacher" / "metrics.jsonl"
    pair.wait_for(history.exists, "epoch 1's checkpoint")
    victim = pair.worker(rank)
    time.sleep(1.0)
    os.kill(victim, signal.SIGKILL)


def resumed_run_matches(module: Module, run_dir: Path) -> float:
    metrics = json.loads((run_dir / "teacher" / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 1, "the killed run resumed from epoch 1's checkpoint"
    assert metrics["replica_max_abs_diff"] == 0.0
    diff = max_weight_diff(run_dir / "teacher" / "model.pt", module.teacher_dir / "teacher" / "model.pt")
    assert diff <= RESUME_TOLERANCE, f"resumed and uninterrupted weights differ by {diff:.2e}"
    return diff


def test_a_killed_worker_is_restarted_and_the_group_resumes_from_the_checkpoint(module):
    run_dir = module.folder / "restarted"
    with two_nodes(module.folder, module.command("teacher"), [run_dir, run_dir], max_restarts=1) as pair:
        kill_after_first_epoch(pair, run_dir, rank=1)
        codes = pair.settle()
        assert codes == [0, 0], pair.outputs()
    assert "restart" in pair.outputs().lower() or "Restarting" in pair.outputs()
    diff = resumed_run_matches(module, run_dir)
    assert_no_torn_files(run_dir)
    print(f"killed rank 1 in epoch 2, restarted: {pair.wall_s:.0f} s; max |w_resumed - w_uninterrupted| = {diff:.2e}")


def test_without_restarts_the_run_fails_in_one_line_and_the_next_launch_resumes(module):
    run_dir = module.folder / "relaunched"
    with two_nodes(module.folder, module.command("teacher"), [run_dir, run_dir]) as pair:
        kill_after_first_epoch(pair, run_dir, rank=0)
        codes = pair.settle()
        survivor = pair.node_of(1)
    assert all(code != 0 for code in codes), pair.outputs()
    errors = survivor.error_lines()
    assert len(errors) == 1 and "rank 1:" in errors[0] and "rank 0" in errors[0] and "resume" in errors[0], \
        survivor.output()[-3000:]
    assert_no_torn_files(run_dir)
    assert torch.load(run_dir / "teacher" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    failed_s = pair.wall_s
    with two_nodes(module.folder, module.command("teacher"), [run_dir, run_dir]) as pair:
        assert pair.settle() == [0, 0], pair.outputs()
    diff = resumed_run_matches(module, run_dir)
    print(f"killed rank 0 in epoch 2, no restarts: failed after {failed_s:.0f} s ({errors[0]}); relaunch "
          f"{pair.wall_s:.0f} s; max |w_resumed - w_uninterrupted| = {diff:.2e}")


def test_a_stalled_rank_fails_the_others_within_the_timeout_naming_it(module):
    run_dir, timeout = module.folder / "stalled", 5
    with two_nodes(module.folder, module.command("teacher"), [run_dir, run_dir],
                   env={"PIPELINE_DIST_TIMEOUT": str(timeout)}) as pair:
        survivor, waited = pair.stall(after="teacher trains in", rank=1)
    errors = survivor.error_lines()
    assert len(errors) == 1 and "rank 1 did not answer" in errors[0], survivor.output()[-3000:]
    # one collective timeout, then at most as long again to find out which rank does not answer
    assert waited < 2 * timeout + 15, f"rank 0 gave up {waited:.0f} s after rank 1 stalled"
    print(f"rank 1 stopped; rank 0 failed {waited:.1f} s later: {errors[0]}")


def test_ranks_that_see_different_run_directories_fail_at_start(module):
    dirs = [module.folder / "node-a" / "run", module.folder / "node-b" / "run"]
    with two_nodes(module.folder, module.command("teacher"), dirs) as pair:
        codes = pair.settle()
        main = pair.node_of(0)
    assert codes == [2, 2] or all(code != 0 for code in codes), pair.outputs()
    errors = main.error_lines()
    assert len(errors) == 1 and "rank 1 cannot see the run directory" in errors[0], main.output()[-3000:]
    assert not any((d / "teacher").exists() for d in dirs), "nothing was trained"
    print(f"unshared run directories: both nodes stopped after {pair.wall_s:.0f} s: {errors[0]}")


def test_two_nodes_distill_then_run_with_rank_0_alone_for_fuse_export_bench(module):
    run_dir = clone_run(module.teacher_dir, module.folder / "pipeline")
    with two_nodes(module.folder, module.command("distill"), [run_dir, run_dir]) as pair:
        assert pair.settle() == [0, 0], pair.outputs()
    distill_s = pair.wall_s
    student = json.loads((run_dir / "student" / "metrics.json").read_text())
    assert student["world_size"] == 2 and student["replica_max_abs_diff"] == 0.0

    # rank 0 stalls in a stage it runs alone: the other rank waits PIPELINE_DIST_WAIT_TIMEOUT, no longer
    with two_nodes(module.folder, module.command("run"), [run_dir, run_dir],
                   env={"PIPELINE_DIST_WAIT_TIMEOUT": "3"}) as pair:
        waiting, waited = pair.stall(after="run: distill", rank=0)
    errors = waiting.error_lines()
    assert len(errors) == 1 and "rank 0 did not finish fuse" in errors[0], waiting.output()[-3000:]
    assert waited < 30, f"rank 1 waited {waited:.0f} s for a stalled rank 0"

    # rank 0 fails alone (its fuse gate cannot pass with a tolerance of 0): the other rank stops with its error
    strict = module.folder / "strict-fuse.yaml"
    strict.write_text(SETTINGS.replace("fuse: {images: 32}", "fuse: {images: 32, fp64_tol: 0, fp32_tol: 0}"))
    with two_nodes(module.folder, module.command("run", strict), [run_dir, run_dir]) as pair:
        codes = pair.settle()
        waiting = pair.node_of(1)
    assert codes == [1, 1], pair.outputs()  # torchrun's own exit code for a failed worker
    errors = waiting.error_lines()
    assert len(errors) == 1 and "rank 0 failed in fuse" in errors[0], waiting.output()[-3000:]
    assert "exitcode  : 3" in waiting.output(), "the waiting rank exits with rank 0's exit code (3: gate)"

    with two_nodes(module.folder, module.command("run"), [run_dir, run_dir]) as pair:
        assert pair.settle() == [0, 0], pair.outputs()
        main_pid = pair.node_of(0).workers[0]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    actions = {name: stage.get("action") for name, stage in manifest["stages"].items()}
    assert actions["teacher"] == actions["distill"] == "skipped" and actions["fuse"] == "ran", actions
    assert manifest["run"]["status"] == "complete" and (run_dir / "report.md").is_file()
    assert lock_holder(run_dir) == main_pid
    print(f"distill on two nodes {distill_s:.0f} s; rank 1 gave up on a stopped rank 0 {waited:.1f} s after the stop; "
          f"run (fuse, export, bench, report on rank 0) {pair.wall_s:.0f} s")


def test_a_checkpoint_of_one_process_resumes_on_two_nodes(module):
    """Elastic membership: the world size changes between the checkpoint and the resume."""
    run_dir = module.folder / "elastic"
    kill_when_written([*module.command("teacher"), "--run-dir", str(run_dir)], run_dir / "teacher" / "metrics.jsonl")
    with two_nodes(module.folder, module.command("teacher"), [run_dir, run_dir]) as pair:
        assert pair.settle() == [0, 0], pair.outputs()
    metrics = json.loads((run_dir / "teacher" / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 1 and metrics["world_size"] == 2
    diff = max_weight_diff(run_dir / "teacher" / "model.pt", module.single_dir / "teacher" / "model.pt")
    assert diff <= PARAM_TOLERANCE, f"resumed on two nodes, weights differ from one process's by {diff:.2e}"
    print(f"one process killed after epoch 1, resumed on two nodes: {pair.wall_s:.0f} s; "
          f"max |w - w_single| = {diff:.2e}")
