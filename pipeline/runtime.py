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
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pipeline.errors import KdepError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtype of each resolved AMP mode
DEFAULT_TIMEOUT_S = 3600  # collective timeout (s) unless KDEP_DIST_TIMEOUT_S is set
BACKENDS = ("gloo", "nccl")  # accepted values of KDEP_DIST_BACKEND
AUTO_WORKERS = -1  # the workers setting that means "the CPU cores available to this rank, minus one"
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


def refuse_several_ranks(command: str, hint: str) -> None:
    """One line, before any work, for a command that runs in one process when launched on several ranks."""
    world = _env_int("WORLD_SIZE", 1)
    if world > 1:
        raise KdepError(f"kdep {command} runs in one process, not on {world} ranks; {hint}")


def launched_by_torchrun() -> bool:
    """Whether a torchrun-style launcher started this process (it sets RANK, WORLD_SIZE and MASTER_ADDR)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def init_distributed(device: str) -> Dist:
    """Join the torchrun job if there is one; returns rank and world size. ``device``: from :func:`pick_device`.
    Under torchrun a world of one also gets a process group, so its collectives run as they would on more ranks
    (an NCCL collective on a CPU tensor fails there too, not only at 8 GPUs)."""
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world <= 1 and not launched_by_torchrun():
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


def describe_failure(err: Exception) -> str:
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
    everyone = all_gather_objects(("error", describe_failure(err)) if err else ("ok", value))
    _raise_any([m for s, m in everyone if s == "error"], err)
    return [v for _, v in everyone]


def on_every_rank(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank and return this rank's result (only the outcome travels); raise as above."""
    value, err = _attempt(fn)
    _raise_any(all_gather_objects(describe_failure(err) if err else None), err)
    return value  # type: ignore[return-value]


def on_main_rank(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank; a failure there is raised on every rank."""
    value, err = _attempt(fn) if _rank() == 0 else (None, None)
    status, payload = broadcast_object(("error", describe_failure(err)) if err else ("ok", value))
    _raise_any([payload if status == "error" else None], err)
    return payload


def local_leader_first(fn: Callable[[], T]) -> T:
    """``fn`` on each node's local rank 0 first, then on the other ranks: a download into the per-node cache (e.g.
    torchvision weights) happens once per node and the others read the cached file. Failures reach every rank."""
    first = _env_int("LOCAL_RANK", 0) == 0
    value = on_every_rank(lambda: fn() if first else None)
    later = on_every_rank(lambda: None if first else fn())
    return value if first else later  # type: ignore[return-value]


_CONTROL: list = []  # the host-side (gloo) group of this process group, made on first use


def _control_group() -> dist.ProcessGroup | None:
    """A gloo group for small host-side agreements: the default group when it is gloo, else one made once (an NCCL
    collective on a device tensor read on the host would sync the GPU stream every step)."""
    if dist.get_backend() == "gloo":
        return None
    if not _CONTROL:
        _CONTROL.append(dist.new_group(backend="gloo"))
    return _CONTROL[0]


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (every rank must call it at the same point; ``flag`` alone without a
    process group)."""
    if not _joined():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group())
    return bool(t.item())


def shutdown() -> None:
    """Destroy the process group at the end of a stage run (leaking it warns under NCCL and can delay exit)."""
    _CONTROL.clear()
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
    """This run's TF32 setting on CUDA, set explicitly (the flags are process-global: a value left by an earlier run
    in the same process must not leak into this one's record): with autocast, convolutions may use TF32 (cuDNN's
    default) and float32 matmuls (projections, losses) do not (torch's default); with amp "off" neither does (~1e-3
    relative error, enough to fail `kdep verify`). Returns whether TF32 may be used (recorded in provenance)."""
    if device.type != "cuda":
        return False
    torch.backends.cudnn.allow_tf32 = amp != "off"
    torch.backends.cuda.matmul.allow_tf32 = False
    return amp != "off"


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """No TF32 inside the block (restored after): finite differences of relative size 1e-2 / ||v|| on weights mostly
    vanish under TF32's 10-bit mantissa."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def autocast_for(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """CUDA autocast in the resolved AMP mode's dtype; a no-op context on CPU or with amp "off"."""
    if device.type == "cuda" and amp in AMP_DTYPES:
        return torch.autocast("cuda", dtype=AMP_DTYPES[amp])
    return contextlib.nullcontext()


def auto_workers() -> int:
    """DataLoader workers for this rank: the CPU cores this process may use, shared among the ranks on this node
    (torchrun's LOCAL_WORLD_SIZE), minus one for the rank's own process (which feeds the device), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, _env_int("LOCAL_WORLD_SIZE", 1)) - 1)


def resolve_workers(workers: int) -> int:
    """``AUTO_WORKERS`` (-1) -> :func:`auto_workers`; any other value is taken as given (0 = the main process)."""
    return auto_workers() if workers == AUTO_WORKERS else workers


def shared_memory_note(stage: str, workers: int, prefetch: int, batch_bytes: int) -> str:
    """One line: what DataLoader batches in flight hold in /dev/shm on this node (every local rank's ``workers`` x
    ``prefetch`` batches of ``batch_bytes``) against what /dev/shm has free, with the fix when it does not fit."""
    ranks = max(1, _env_int("LOCAL_WORLD_SIZE", 1))
    need = ranks * workers * prefetch * batch_bytes
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        free = None
    line = (f"{stage}: DataLoader batches in shared memory ~{need / 2**20:.0f} MiB on this node ({ranks} rank(s) x "
            f"{workers} worker(s) x {prefetch} batches x {batch_bytes / 2**20:.1f} MiB)")  # fmt: skip
    if free is None:
        return line
    line += f"; /dev/shm has {free / 2**20:.0f} MiB free"
    if need > free:
        line += " -- too little: raise it (docker run --shm-size=16g) or lower --workers / --prefetch-factor"
    return line


@contextlib.contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """torch's CPU threads and the BLAS / OpenMP pools of numpy, scipy and scikit-learn capped at ``threads`` inside
    the block (0: left as they are), restored after it. A fixed count fixes the order of floating-point reductions,
    so a re-run gives the same numbers on the same kind of CPU whatever its core count; and on a machine shared with
    other jobs, more threads than free cores wait on each other."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads or None):
            yield
    finally:
        torch.set_num_threads(before)
