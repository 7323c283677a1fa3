"""torch.distributed and AMP plumbing shared by the stages: init from the environment, barriers, object
broadcasts, the device, and autocast.

Under ``torchrun`` (WORLD_SIZE > 1) a process group is created with gloo on CPU and nccl on CUDA; without it every
helper here is a no-op for a single process, so stages run the same code either way. AMP is CUDA-only: on CPU the
resolved mode is always "off".
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import KdepError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtype of each resolved AMP mode


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the torchrun job if there is one (gloo for CPU, nccl for CUDA); returns rank and world size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if device.startswith("cuda"):  # NCCL collectives run on the current device: one GPU per local rank
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdepError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if name == "cuda":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return torch.device(name)


def resolve_amp(amp: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA (fp16 where bf16 is unsupported), off on CPU; any mode is "off" on CPU."""
    if amp != "auto":
        return amp if device.type == "cuda" else "off"
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_for(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """CUDA autocast in the resolved AMP mode's dtype; a no-op context on CPU or with amp "off"."""
    if device.type == "cuda" and amp in AMP_DTYPES:
        return torch.autocast("cuda", dtype=AMP_DTYPES[amp])
    return contextlib.nullcontext()
