"""Reading a feature cache back against its source shards: with ``store.py``, what later stages may import.

- :func:`source_shard_paths` finds the shards a cache was made from again, and refuses ones that changed since.
- :func:`join_sample` joins one streamed sample to its cached row and replays one stored view of it;
  :func:`join_row` does the same for a row whose image bytes were found another way (by tar offset, by key).
- :func:`source_samples` reads the samples of chosen rows from their source shard, by the byte offsets the cache
  recorded (only those samples' bytes); for a cache made before offsets were recorded, by one pass over the shard.

The join is the one definition of "this image is the one that was cached", shared by stage 3's stream, its
neighbour batches and ``inspect-cache --verify``: by key (never by position), the row's validity (rows skipped
while caching have no features), the image hash *before* decoding (a changed image may not decode at all), the
decoded size, then the replay of the chosen view with :func:`pipeline.data.views.replay_view`::

    from pipeline.cache.join import JoinError, SkippedAtCaching, join_sample
    block = store.read_slot(shard, taps=["pre_relu"], views=[2])  # the rows of one shard, view 2 only
    joined = join_sample(block, sample, shard_path, view=2, resolution=112)  # JoinedView | SkippedAtCaching
    x, target = joined.image, block.feature("pre_relu", joined.row, joined.view)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from pipeline.cache.store import FeatureStore, ShardBlock
from pipeline.data.images import DecodeError, decode_rgb, image_bytes, image_hash
from pipeline.data.random_access import iter_samples_at
from pipeline.data.shards import Sample, ShardError, iter_samples, list_shards
from pipeline.data.views import replay_for_transport, replay_view
from pipeline.errors import KdepError
from pipeline.models import FeatureTaps, Preprocessing, build_model
from pipeline.teachers import split_tap, teacher_records

JoinReason = Literal["missing", "changed", "undecodable"]


class SourceError(KdepError):
    """The shards or the teacher weights found now are not the ones the cache was made from."""


class JoinError(KdepError):
    """A sample and the cache disagree; the message names shard and key, ``reason`` says how (for counting)."""

    def __init__(self, message: str, reason: JoinReason = "changed") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.reason)  # keep the reason when a DataLoader worker pickles it


@dataclass(frozen=True)
class JoinedView:
    """A sample joined to its cached row: which row, which view, and that view replayed."""

    row: int  # row in the shard's block
    view: int  # the replayed view, 0..K-1
    image: (
        torch.Tensor
    )  # (3, r, r) float32, normalised as the teacher's input was (uint8 before normalisation
    # with ``transport=True`` when exact: pipeline.data.views.normalize_views finishes it, bit-identically)
    extra: tuple[torch.Tensor, ...] = ()  # the same view replayed at each of ``extra_resolutions``, in order

    @property
    def views(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``image`` alone, or ``(image, *extra)`` when the view was also replayed at other resolutions."""
        return (self.image, *self.extra) if self.extra else self.image


@dataclass(frozen=True)
class SkippedAtCaching:
    """The sample's row was skipped (and recorded) when the cache was made, so it has no features to pair with."""

    row: int  # row in the shard's block


def source_shard_paths(store: FeatureStore, override: str = "") -> list[str]:
    """Paths of the cache's source shards in the cache's order, from ``override`` or the recorded source.

    Names, byte sizes and (where the listing has them) sample counts and sha256 must match the cache's record;
    per-image hashes are checked again by the join.
    """
    spec = override or store.provenance["recorded"]["source"]
    try:
        listed = {s.name: s for s in list_shards(spec)}
    except ShardError as err:
        raise SourceError(
            f"cannot list the source shards of {store.path} ({err}); pass --shards with their new location"
        ) from None
    paths = []
    for rec in store.layout.shards:
        info = listed.get(rec["name"])
        if info is None:
            raise SourceError(
                f"{store.path} was cached from shard {rec['name']}, which is not in {spec}; pass --shards"
            )
        changed = info.nbytes != rec["nbytes"] or (
            info.samples is not None and info.samples != rec["samples"]
        )
        changed = changed or (info.sha256 is not None and rec.get("sha256") and info.sha256 != rec["sha256"])
        if changed:
            raise SourceError(
                f"shard {info.path} changed since {store.path} was cached (size, count or sha256 differs); "
                "restore it or re-run cache-teacher"
            )
        paths.append(str(Path(info.path)))
    return paths


def source_samples(
    store: FeatureStore, shard_index: int, rows: Sequence[int], path: str, keys: Sequence[str] | None = None
) -> Iterator[Sample]:
    """The source samples of ``rows`` (rows of done shard ``shard_index``'s block, any order) from the shard's tar
    at ``path``, in the order asked, one at a time. ``keys``: the shard's row keys when the caller has them (a
    :class:`ShardBlock`'s), else read from the cache.

    With recorded offsets, each sample is read from its offset (its headers and data only) and must carry the
    row's key; a cache made before offsets were recorded reads the shard once instead. Either way a sample the
    shard no longer holds is a ShardError naming the shard and key (the shard changed since caching)."""
    keys = store.shard_keys(shard_index) if keys is None else keys
    offsets = store.read_offsets(shard_index)
    if offsets is not None and all(offsets[r] >= 0 for r in rows):
        yield from iter_samples_at(path, [(int(offsets[r]), keys[r]) for r in rows])
        return
    wanted = {keys[r] for r in rows}
    found = {s.key: s for s in iter_samples(path) if s.key in wanted}
    missing = sorted(wanted - set(found))
    if missing:
        raise ShardError(
            f"{path}: keys {missing[:3]} are cached but not in the shard; the shard changed since caching "
            "(restore it or re-run cache-teacher)"
        )
    yield from (found[keys[r]] for r in rows)


def join_sample(
    block: ShardBlock,
    sample: Sample,
    path: str,
    view: int,
    resolution: int,
    transport: bool = False,
    extra_resolutions: tuple[int, ...] = (),
) -> JoinedView | SkippedAtCaching:
    """Join a sample of shard ``path`` to its row in the shard's cached ``block`` by key, and replay ``view``.

    Returns :class:`SkippedAtCaching` for a row the cache recorded as skipped; raises :class:`JoinError` when the
    cache does not hold the key (``missing``), the image is not the cached one (``changed``) or has no decodable
    image (``undecodable``). ``transport``, ``extra_resolutions``: see :func:`join_row`.
    """
    row = block.row_of().get(sample.key)
    if row is None:
        raise JoinError(
            f"{_where(path, sample.key)} is not in the cache {block.cache}; the shard changed since caching "
            "(re-run cache-teacher)",
            "missing",
        )
    if not block.valid[row]:
        return SkippedAtCaching(row)
    try:
        return join_row(
            block, row, image_bytes(sample, path), path, view, resolution, transport, extra_resolutions
        )
    except DecodeError as err:
        raise JoinError(str(err), "undecodable") from None


def join_row(
    block: ShardBlock,
    row: int,
    data: bytes,
    path: str,
    view: int,
    resolution: int,
    transport: bool = False,
    extra_resolutions: tuple[int, ...] = (),
) -> JoinedView:
    """Check that ``data`` (encoded bytes) is the image cached at valid ``row``, then replay ``view`` of it.

    The hash is checked before decoding (a changed image may not decode), the decoded size after. Raises
    :class:`JoinError` (``changed``) when the image is not the cached one, and lets
    :class:`~pipeline.data.images.DecodeError` through when the bytes do not decode. ``transport=True`` keeps the
    view uint8 when that is exact (:func:`pipeline.data.views.replay_for_transport`), for DataLoader workers.
    ``extra_resolutions``: also replay the view at these sides from the same decoded image (an online teacher's
    own input sides, as stage 1 replayed them).
    """
    where = _where(path, block.keys[row])
    if image_hash(data) != bytes(block.hashes[row]):
        raise _changed(where)
    image = decode_rgb(data, where)
    if tuple(image.shape[1:]) != tuple(block.hw[row]):
        raise _changed(where)
    replay = replay_for_transport if transport else replay_view
    params = block.view_params(row, view)
    extra = tuple(replay(image, params, r) for r in extra_resolutions)
    return JoinedView(row, view, replay(image, params, resolution), extra)


def _where(path: str, key: str) -> str:
    return f"{path} key {key!r}"


def _changed(where: str) -> JoinError:
    return JoinError(
        f"{where}: image differs from the cached one (hash or size); re-run cache-teacher on these shards",
        "changed",
    )


def rebuild_teacher(store: FeatureStore, taps: tuple[str, ...] | None = None) -> nn.Module:
    """The teacher(s) the cache records (architecture, weights and constructor arguments; a weights file must still
    have the recorded sha256), in eval mode, with the recorded normalisation, returning ``taps`` (stored names;
    default: every cached tap): (B, 3, r, r) ImageNet-normalised views -> {tap: (B, D_t)}, exactly as stage 1 ran
    it. One teacher: its :class:`FeatureTaps`. Several: a :class:`TeacherEnsemble` running each teacher whose taps
    are asked for on the same views (stage 1 gave each its own resolution: see :func:`rebuild_teachers`)."""
    parts = rebuild_teachers(store, taps)
    if len(teacher_records(store.provenance)) == 1:
        return parts[0][1]
    return TeacherEnsemble({r["label"]: t for r, t in parts})


def rebuild_teachers(
    store: FeatureStore, taps: tuple[str, ...] | None = None
) -> list[tuple[dict, FeatureTaps]]:
    """(teacher record, its rebuilt :class:`FeatureTaps` for its asked-for taps) for each teacher with a tap in
    ``taps`` (default: every cached tap); the record has its ``label`` and input ``resolution``."""
    records = teacher_records(store.provenance)
    for name in taps or ():
        store.feature_array(name)  # refuses a tap the cache does not hold, naming those it has
    out = []
    for record in records:
        mine = [x for x in record["cache_taps"] if taps is None or x in taps]
        if mine:
            out.append((record, _rebuild_one(store, record, tuple(split_tap(x)[1] for x in mine))))
    return out


def _rebuild_one(store: FeatureStore, teacher: dict, taps: tuple[str, ...]) -> FeatureTaps:
    recorded = store.provenance["recorded"]
    weights = teacher["weights"]
    kwargs = weights.get("model_kwargs")
    if weights["kind"] == "file":
        path = Path(
            recorded["weights_paths"][teacher["label"]] if teacher["label"] else recorded["weights_path"]
        )
        model, identity = build_model(teacher["arch"], str(path), model_kwargs=kwargs)
        if identity["sha256"] != weights["sha256"]:
            raise SourceError(
                f"weights file {path} changed since the cache was made (sha256 differs); restore it"
            )
    elif weights["kind"] == "torchvision":
        model, _ = build_model(teacher["arch"], weights["name"].split(".")[-1], model_kwargs=kwargs)
    elif weights["kind"] == "timm":  # name "<model>.<tag>": the tag picks the same pretrained weights
        tag = weights["name"].split(".", 1)[1] if "." in weights["name"] else "pretrained"
        model, _ = build_model(teacher["arch"], tag, model_kwargs=kwargs)
    else:
        who = f"teacher {teacher['label']!r}" if teacher["label"] else "teacher"
        raise SourceError(f"{store.path} was cached from a randomly initialised {who}; it cannot be rebuilt")
    prep = teacher.get("normalization")
    return FeatureTaps(model.eval(), taps, from_imagenet=Preprocessing.from_dict(prep) if prep else None)


class TeacherEnsemble(nn.Module):
    """Several rebuilt teachers on the same views: (B, 3, r, r) -> {``LABEL/TAP``: (B, D)}."""

    def __init__(self, teachers: dict[str, FeatureTaps]) -> None:
        super().__init__()
        self.teachers = nn.ModuleDict(teachers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"{label}/{tap}": v for label, t in self.teachers.items() for tap, v in t(x).items()}
