"""The ``--online-teacher`` baseline: the recorded teacher(s) run live in stage 3, each exactly as stage 1 ran it.

Stage 1 replays every view once per distinct teacher input side and feeds each teacher its own side and its own
normalisation. The live teacher does the same: the stream replays each view at the student's side and at every
teacher side that differs from it (from the same decoded image, with the same stored parameters), and each teacher
reads the batch at its own side, re-normalised with its own mean/std. Its targets therefore equal the cached rows up
to the stored dtype's rounding, whatever the student's resolution (a fixed-size ViT teacher keeps its input size).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.cache.join import rebuild_teachers
from pipeline.cache.store import FeatureStore
from pipeline.models import FeatureTaps
from pipeline.teachers import teacher_records


class OnlineTeacher(nn.Module):
    """Rebuilt teachers, each with the view side it reads: ``{side: (B, 3, side, side)}`` normalised views ->
    ``{cache tap: (B, D)}`` (stored names: ``TAP``, or ``LABEL/TAP`` in a multi-teacher cache)."""

    def __init__(self, parts: list[tuple[str, int, FeatureTaps]]) -> None:
        super().__init__()
        self.labels = [label for label, _, _ in parts]
        self.sides = [side for _, side, _ in parts]
        self.parts = nn.ModuleList(taps for _, _, taps in parts)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """The distinct input sides, in teacher order."""
        return tuple(dict.fromkeys(self.sides))

    def forward(self, views: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for label, side, taps in zip(self.labels, self.sides, self.parts, strict=True):
            prefix = f"{label}/" if label else ""
            out.update({f"{prefix}{tap}": v for tap, v in taps(views[side]).items()})
        return out


def build_online_teacher(
    store: FeatureStore, taps: tuple[str, ...], device: torch.device, channels_last: bool = False
) -> OnlineTeacher:
    """The teachers the cache records whose taps are in ``taps`` (stored names), frozen, in eval mode, on ``device``
    (channels_last on CUDA when asked), each with its recorded input side and normalisation."""
    parts = []
    for record, model in rebuild_teachers(store, taps):
        model = model.to(device).requires_grad_(False)
        if device.type == "cuda" and channels_last:
            model = model.to(memory_format=torch.channels_last)
        parts.append((record["label"], int(record["resolution"]), model))
    return OnlineTeacher(parts)


def extra_sides(store: FeatureStore, taps: tuple[str, ...], student_side: int) -> tuple[int, ...]:
    """The view sides the stream must replay besides the student's for the teachers of ``taps``: every recorded
    teacher input side that differs from ``student_side``, in teacher order."""
    sides = [
        int(r["resolution"]) for r in teacher_records(store.provenance) if set(r["cache_taps"]) & set(taps)
    ]
    return tuple(s for s in dict.fromkeys(sides) if s != student_side)
