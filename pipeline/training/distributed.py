"""torch.distributed plumbing for stages launched by ``torchrun`` (DDP; gloo on CPU, nccl on CUDA).

Without torchrun's environment everything degrades to a single process and
every collective is a no-op, so stage code reads the same either way.

Two time limits bound every wait between ranks (docs/distributed.md):

* ``PIPELINE_DIST_TIMEOUT`` (seconds): one collective (a DDP all-reduce, a
  barrier). A rank that stalls or dies makes the others fail after this long
  with an error that names it, instead of hanging. Default 900 s with gloo
  (CPU: ranks on busy hosts drift apart more) and 600 s with nccl (GPU).
* ``PIPELINE_DIST_WAIT_TIMEOUT`` (seconds): how long the other ranks of
  ``pipeline run`` wait for one of rank 0's own stages (fuse, export, bench,
  report). Default 7200 s.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import BadInputError, RankFailedError

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = {"gloo": 900.0, "nccl": 600.0}
DEFAULT_WAIT_TIMEOUT_S = 7200.0
DIAGNOSIS_MAX_S = 60.0  # how long a failed rank waits, at most, to learn which ranks still answer
# what gloo and nccl say when a peer stops answering or its connection drops (they raise plain RuntimeErrors)
_COMMUNICATION = re.compile(r"gloo|nccl|time(d)? ?out|connection (closed|reset|refused)|broken pipe|pair closure",
                            re.IGNORECASE)
_TIMEOUT = re.compile(r"time(d)? ?out", re.IGNORECASE)


MAX_SECONDS = 7 * 24 * 3600.0  # a week: longer is a typo, not a timeout


def seconds_setting(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable ``name`` (``default`` when unset)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:  # (NaN too)
        raise BadInputError(f"{name}={text!r} is not a positive number of seconds")
    if not value <= MAX_SECONDS:  # inf too: a timedelta cannot hold it
        raise BadInputError(f"{name}={text!r} is over a week ({MAX_SECONDS:g} s): a typo, not a timeout")
    return value


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = DEFAULT_TIMEOUT_S["gloo"]
    # a gloo group beside the training one: rank 0's stage outcomes and the diagnosis of a failed collective
    # travel on it (it works under nccl too, and is not the group a timeout has just broken)
    control: Any = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (returns a new tensor on the context's device)."""
        values = values.detach().to(self.device, torch.float64).clone()
        if self.distributed:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of a picklable object, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's value of a picklable object, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def announce(self, failure: tuple[int, str] | None) -> None:
        """Rank 0: tell the ranks in :meth:`wait_for_main` how the stage it ran alone ended (None: it finished;
        else its exit code and one-line error)."""
        if self.distributed:
            dist.broadcast_object_list([failure], src=0, group=self.control)

    def wait_for_main(self, stage: str) -> None:
        """Other ranks: wait (``PIPELINE_DIST_WAIT_TIMEOUT`` at most) while rank 0 runs ``stage`` alone; raise
        rank 0's failure, with its exit code, when it failed."""
        if not self.distributed:
            return
        box: list[Any] = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=self.control)
        except RuntimeError as exc:
            raise RankFailedError(f"rank {self.rank}: rank 0 did not finish {stage} (died, or took longer than "
                                  f"PIPELINE_DIST_WAIT_TIMEOUT): {_first_line(exc)}") from None
        if box[0] is not None:
            code, line = box[0]
            raise RankFailedError(f"rank {self.rank}: rank 0 failed in {stage}: {line}", exit_code=code)

    def diagnose(self) -> str:
        """After a failed collective: which ranks still answer (gloo's monitored barrier, on rank 0's side)."""
        wait = min(self.timeout_s, DIAGNOSIS_MAX_S)
        try:
            dist.monitored_barrier(group=self.control, timeout=datetime.timedelta(seconds=wait), wait_all_ranks=True)
        except RuntimeError as exc:
            missing = re.search(r"Ranks? ([\d, ]+) failed to pass", str(exc))
            if missing:
                return f"rank {missing.group(1).strip()} did not answer within {wait:.0f} s (stalled or dead)"
            who = "rank 0" if self.rank else "another rank"
            return f"{who} did not answer ({_first_line(exc)})"
        return "every rank still answers"

    @contextlib.contextmanager
    def collective_failures(self) -> Iterator[None]:
        """Turn a collective that failed (a rank stalled past ``PIPELINE_DIST_TIMEOUT``, died or lost its
        connection) into a one-line :class:`RankFailedError` that names the rank that did not answer."""
        try:
            yield
        except RuntimeError as exc:
            if not self.distributed or not (
                    isinstance(exc, dist.DistError) or _COMMUNICATION.search(str(exc))):
                raise
            what = (f"a collective waited {self.timeout_s:.0f} s (PIPELINE_DIST_TIMEOUT) in vain"
                    if _TIMEOUT.search(str(exc)) else "lost the connection to another rank")
            raise RankFailedError(f"rank {self.rank}: {what}: {self.diagnose()}; rerun the same command to resume from "
                                  f"the last checkpoint (first error: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    """The first sentence of an error, without the source location gloo puts in front of it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return re.sub(r"^\[[^\]]*\]:?\s*", "", lines[0]).split(". ")[0]


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but is not available")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun set up (env://), or return a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = seconds_setting("PIPELINE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S[backend])
    control = None
    if world > 1:
        wait = seconds_setting("PIPELINE_DIST_WAIT_TIMEOUT", DEFAULT_WAIT_TIMEOUT_S)
        _warn_of_shared_store(rank)
        try:
            if not dist.is_initialized():
                if dev.type == "cuda":
                    torch.cuda.set_device(dev)
                dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
            control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=wait))
        except RuntimeError as exc:
            raise RankFailedError(f"rank {rank}: cannot join the other {world - 1} ranks: {_first_line(exc)}") from None
        log.info("joined process group: rank %d of %d (%s, collective timeout %.0f s)", rank, world, backend,
                 timeout)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, timeout_s=timeout,
                       control=control)


def _warn_of_shared_store(rank: int) -> None:
    """torchrun's default store shared with its rendezvous outlives a restart, and a restarted group may read the
    last round's addresses from it and fail to connect (pytorch/pytorch#135712): restarts need it off."""
    text = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0").strip()
    restarts = int(text) if text.isdigit() else 0  # torchrun sets it; anything else is not a restart count
    if rank == 0 and restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        log.warning("torchrun --max-restarts=%d shares its rendezvous store with the workers: a restarted group can "
                    "then fail to connect; launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                    "(docs/distributed.md)", restarts)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
