"""How many lanes (parallel chunk chains = threads of the local dask scheduler) a fit runs: cores, capped by memory.

Each lane holds one slot of features, its float64 work and its running totals at once (``pipeline.projection.passes``
and ``moments``), so memory grows with the lanes: about 250 MiB each for ImageNet-shaped slots (1024 rows x 10 views
x 2048 float16). On a 192-core node one lane per core would take ~48 GiB. The choice is

    lanes = min(--lanes or the usable cores, lanes that fit in MEMORY_SHARE of the available memory, slots to read)

and at least 1. Per-lane bytes are computed from the layout (``lane_bytes``; measured against tracemalloc in
tests/test_fit_lanes.py); available memory is the smaller of the system's (psutil: free + reclaimable page cache)
and the cgroup limit's headroom (a SLURM job or a container sees the node's memory in /proc/meminfo, not its own
limit).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.cache.store import FeatureStore
from pipeline.projection.moments import SLICE_ROWS, TARGET_SLICE_ROWS
from pipeline.projection.passes import RowSelection

MEMORY_SHARE = (
    0.5  # of the available memory the lanes may plan on (the rest: other processes, the page cache)
)
# per lane besides its arrays (thread stack, malloc arena, BLAS buffers, zarr's codec objects): at ImageNet shape
# the process's peak RSS grew 225-256 MiB per lane where lane_bytes' arrays come to 208 MiB
LANE_OVERHEAD = 48 << 20
TARGET_TEMPORARIES = (
    2,
    4,
)  # float64 (rows, D_t) and (rows, D_s) arrays alive at once while projecting a slice
CGROUP = Path("/sys/fs/cgroup")  # cgroup v2 (memory.max, memory.current); v1: memory/memory.limit_in_bytes


@dataclass(frozen=True)
class LaneChoice:
    """The lanes of one fit and why."""

    lanes: int  # parallel chunk chains (= threads of the local scheduler)
    requested: int  # --lanes (0 = auto)
    cores: int  # cores this process may use
    by_memory: int  # lanes that fit in MEMORY_SHARE of the available memory
    slots: int  # slots to read (more lanes than slots would idle)
    lane_bytes: int  # planned bytes per lane
    available_bytes: int  # available memory when the fit started
    limited_by: str  # "cores", "--lanes", "memory" or "slots"

    def describe(self) -> str:
        """Banner text: ``4 lanes (memory: 0.20 GiB a lane, 1.6 of 3.2 GiB free; 16 cores)``."""
        gib = 2**30
        text = (
            f"{self.lanes} lane{'s' if self.lanes != 1 else ''} ({self.limited_by}: "
            f"{self.lane_bytes / gib:.2f} GiB a lane, {self.available_bytes / gib:.1f} GiB available, "
            f"{self.cores} cores"
        )
        if self.requested:
            text += f", --lanes {self.requested}"
        if self.by_memory < 1:
            text += "; NOT ENOUGH MEMORY FOR ONE LANE: expect swapping, free memory or fit fewer --views"
        return text + ")"

    def record(self) -> dict:
        """What the projection's manifest records."""
        return {**asdict(self), "memory_share": MEMORY_SHARE}


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: a SLURM or taskset allocation, not the node's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cgroup_headroom(root: Path = CGROUP) -> int | None:
    """Bytes this process's cgroup may still allocate (limit - usage), or None without a memory limit."""
    pairs = (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    )
    for limit_name, usage_name in pairs:
        try:
            limit = (root / limit_name).read_text().strip()
            usage = int((root / usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" (v2) or a huge number (v1): no limit
            return max(0, int(limit) - usage)
    return None


def available_memory() -> int:
    """Bytes that can be allocated without swapping: the system's available memory, within the cgroup's limit."""
    import psutil

    available = int(psutil.virtual_memory().available)
    headroom = cgroup_headroom()
    return available if headroom is None else min(available, headroom)


def lane_bytes(
    slot_rows: int, views: int, dim: int, itemsize: int, dim_student: int, copies_rows: bool
) -> int:
    """Peak bytes one lane holds: one slot of ``views`` views (R, V, D_t) as read, one view's read buffers, the
    selected rows' copy when they are not one run (``copies_rows``), and the larger of the two passes' work:
    statistics (a float64 slice of SLICE_ROWS rows and three D_t x D_t float64 Grams: the chunk's, the lane's
    running total and their sum) and targets (float64 temporaries of TARGET_SLICE_ROWS rows)."""
    slot = slot_rows * views * dim * itemsize
    read = 2 * slot_rows * dim * itemsize  # one view's compressed and decoded buffers
    stats = min(SLICE_ROWS, slot_rows * views) * dim * 8 + 3 * dim * dim * 8
    wide, narrow = TARGET_TEMPORARIES
    targets = min(TARGET_SLICE_ROWS, slot_rows * views) * 8 * (wide * dim + narrow * dim_student)
    return slot * (2 if copies_rows else 1) + read + max(stats, targets) + LANE_OVERHEAD


def rows_are_runs(rows: np.ndarray, slot_rows: int) -> bool:
    """Whether the selected rows of every slot form one run of adjacent rows (then no lane copies them)."""
    per_slot = rows.reshape(-1, slot_rows)
    count = per_slot.sum(axis=1)
    first = np.argmax(per_slot, axis=1)
    last = slot_rows - 1 - np.argmax(per_slot[:, ::-1], axis=1)
    used = count > 0
    return bool(np.all((last - first + 1)[used] == count[used]))


def choose_lanes(requested: int, cores: int, slots: int, per_lane: int, available: int) -> LaneChoice:
    """min(requested or cores, lanes fitting in MEMORY_SHARE x available, slots), at least 1; with the reason."""
    by_memory = int(MEMORY_SHARE * available // per_lane)
    caps = {
        "--lanes" if requested else "cores": requested or cores,
        "memory": by_memory,
        "slots": slots,
    }
    limited_by = min(caps, key=lambda k: caps[k])  # the first smallest: the flag or cores win ties
    lanes = max(1, caps[limited_by])
    return LaneChoice(lanes, requested, cores, by_memory, slots, per_lane, available, limited_by)


def plan_lanes(
    store: FeatureStore, tap: str, selection: RowSelection, dim_student: int, requested: int = 0
) -> LaneChoice:
    """The lanes of a local fit of ``tap`` over ``selection`` of ``store`` (``requested`` = --lanes, 0 = auto)."""
    r = store.layout.slot_rows
    slots = int(np.unique(np.flatnonzero(selection.rows) // r).size)
    per_lane = lane_bytes(
        r, len(selection.views), store.layout.dims[tap], np.dtype(store.layout.dtype).itemsize,
        dim_student, not rows_are_runs(selection.rows, r),
    )  # fmt: skip
    return choose_lanes(requested, usable_cores(), slots, per_lane, available_memory())
