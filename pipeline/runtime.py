"""torch.distributed and AMP plumbing shared by the stages: init from the environment, collectives that never
leave a rank waiting on a dead one, the device, TF32 and autocast.

Under ``torchrun`` (WORLD_SIZE > 1) a process group is created with gloo on CPU and nccl on CUDA (override with
``KDEP_DIST_BACKEND``, e.g. gloo so two ranks can share one GPU); without it every helper here is a no-op for a
single process, so stages run the same code either way. Collectives wait up to ``KDEP_DIST_TIMEOUT_S`` (default one
hour: a rank may wait for the slowest rank's last shard, or for rank 0 creating a store). Work that can fail goes
through :func:`gather_from_ranks`, :func:`on_every_rank` or :func:`on_main_rank`: a failure on any rank is raised
on every rank, so the job exits instead of hanging in the next collective. AMP is CUDA-only: on CPU the resolved
mode is always "off".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pipeline.errors import KdepError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtype of each resolved AMP mode
DEFAULT_TIMEOUT_S = 3600  # collective timeout (s) unless KDEP_DIST_TIMEOUT_S is set
BACKENDS = ("gloo", "nccl")  # accepted values of KDEP_DIST_BACKEND
T = TypeVar("T")


class RankError(KdepError):
    """Another rank failed; raised on the ranks that did not, with that rank's one-line message."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


def dist_timeout() -> timedelta:
    """How long a collective waits for the slowest rank: ``KDEP_DIST_TIMEOUT_S`` seconds, default one hour (the
    libraries' 10-minute default is shorter than a rank's last shard on a slow filesystem)."""
    text = os.environ.get("KDEP_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise KdepError(f"KDEP_DIST_TIMEOUT_S={text!r} is not a positive number of seconds; e.g. 3600")
    return timedelta(seconds=seconds)


def dist_backend(device: str) -> str:
    """nccl on CUDA, gloo on CPU, or ``KDEP_DIST_BACKEND`` (gloo lets several ranks share one GPU in tests)."""
    default = "nccl" if device.startswith("cuda") else "gloo"
    backend = os.environ.get("KDEP_DIST_BACKEND", default)
    if backend not in BACKENDS:
        raise KdepError(
            f"KDEP_DIST_BACKEND={backend!r} is not one of {', '.join(BACKENDS)}; unset it or fix it"
        )
    if backend == "nccl" and not device.startswith("cuda"):
        raise KdepError(
            f"KDEP_DIST_BACKEND=nccl needs a CUDA device, not {device}; use gloo or --device cuda"
        )
    return backend


def init_distributed(device: str) -> Dist:
    """Join the torchrun job if there is one; returns rank and world size. ``device``: from :func:`pick_device`."""
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world <= 1:
        return Dist()
    dev = torch.device(device)
    if dev.type == "cuda":  # NCCL collectives run on the current device
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = dist_backend(device)
        bound = {"device_id": dev} if backend == "nccl" else {}  # binds the communicator to this rank's GPU
        dist.init_process_group(backend=backend, timeout=dist_timeout(), **bound)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _joined():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (identity without a process group)."""
    if not _joined():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    if not _joined():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _rank() -> int:
    return dist.get_rank() if _joined() else 0


def _attempt(fn: Callable[[], T]) -> tuple[T | None, Exception | None]:
    try:
        return fn(), None
    except Exception as err:  # any failure must reach the other ranks, not only user errors
        return None, err


def _describe(err: Exception) -> str:
    """``rank R failed: <one line>``; a DataLoader worker's error arrives with its traceback prepended, and the
    last line (``module.Type: message``) is the original message."""
    lines = [line for line in str(err).splitlines() if line.strip()] or [""]
    head, sep, tail = lines[-1].partition(": ")
    text = tail if len(lines) > 1 and sep and head.endswith(type(err).__name__) else lines[-1]
    text = text if isinstance(err, KdepError) else f"{type(err).__name__}: {text}"
    return f"rank {_rank()} failed: {text}"


def _raise_any(messages: list[str | None], local: Exception | None) -> None:
    """Re-raise this rank's own exception (with its traceback), or the first other rank's message."""
    if local is not None:
        raise local
    failed = [m for m in messages if m]
    if failed:
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise RankError(f"{failed[0]}{more}")


def gather_from_ranks(fn: Callable[[], T]) -> list[T]:
    """Run ``fn`` on every rank and return every rank's result in rank order; if it raised anywhere, raise on
    every rank (the failing rank re-raises its own exception, the others a :class:`RankError` naming it)."""
    value, err = _attempt(fn)
    everyone = all_gather_objects(("error", _describe(err)) if err else ("ok", value))
    _raise_any([m for s, m in everyone if s == "error"], err)
    return [v for _, v in everyone]


def on_every_rank(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank and return this rank's result (only the outcome travels); raise as above."""
    value, err = _attempt(fn)
    _raise_any(all_gather_objects(_describe(err) if err else None), err)
    return value  # type: ignore[return-value]


def on_main_rank(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank; a failure there is raised on every rank."""
    value, err = _attempt(fn) if _rank() == 0 else (None, None)
    status, payload = broadcast_object(("error", _describe(err)) if err else ("ok", value))
    _raise_any([payload if status == "error" else None], err)
    return payload


def local_leader_first(fn: Callable[[], T]) -> T:
    """``fn`` on each node's local rank 0 first, then on the other ranks: a download into the per-node cache (e.g.
    torchvision weights) happens once per node and the others read the cached file. Failures reach every rank."""
    first = _env_int("LOCAL_RANK", 0) == 0
    value = on_every_rank(lambda: fn() if first else None)
    later = on_every_rank(lambda: None if first else fn())
    return value if first else later  # type: ignore[return-value]


def shutdown() -> None:
    """Destroy the process group at the end of a stage run (leaking it warns under NCCL and can delay exit)."""
    if _joined():
        dist.destroy_process_group()


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' -> this rank's GPU, ``LOCAL_RANK % visible GPUs`` (SLURM
    per-task isolation shows each rank one device, torchrun on one node shows them all)."""
    world = _env_int("WORLD_SIZE", 1)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdepError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if name.startswith("cuda:") and world > 1:
        raise KdepError(
            f"--device {name} with {world} ranks would put every rank on one GPU; use --device cuda or auto "
            "(each rank then takes LOCAL_RANK % visible GPUs)"
        )
    if name == "cuda":
        name = f"cuda:{_env_int('LOCAL_RANK', 0) % max(1, torch.cuda.device_count())}"
    return torch.device(name)


def _bf16_native() -> bool:
    """bf16 in hardware (Ampere+); V100/T4 only emulate it, slower than fp16. Older torch lacks the argument."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:
        return bool(torch.cuda.is_bf16_supported())


def resolve_amp(amp: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA (fp16 where bf16 is only emulated), off on CPU; any mode is "off" on CPU."""
    if amp != "auto":
        return amp if device.type == "cuda" else "off"
    if device.type != "cuda":
        return "off"
    return "bf16" if _bf16_native() else "fp16"


def set_tf32(device: torch.device, amp: str) -> bool:
    """With amp "off" on CUDA, turn TF32 off for convolutions and matmuls (cuDNN allows it by default, ~1e-3
    relative error, enough to fail `kdep verify`); returns whether TF32 may be used (recorded in provenance)."""
    if device.type != "cuda":
        return False
    if amp == "off":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


def autocast_for(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """CUDA autocast in the resolved AMP mode's dtype; a no-op context on CPU or with amp "off"."""
    if device.type == "cuda" and amp in AMP_DTYPES:
        return torch.autocast("cuda", dtype=AMP_DTYPES[amp])
    return contextlib.nullcontext()
