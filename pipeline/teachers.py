"""Several teachers in one cache: their labels, the cache tap names and the records the provenance keeps (torch-free).

A cache holds one teacher or several. ``--teacher resnet50`` gives the usual single-teacher cache: its feature
arrays are named by tap (``pre_relu``) and its provenance has one ``teacher`` record. ``--teacher cnn=resnet50
--teacher vit=timm:vit_base_patch14_dinov2`` caches both teachers in one pass (each image decoded once, each view
replayed once per distinct resolution): its feature arrays are named ``LABEL/TAP`` (``cnn/pre_relu``,
``vit/pooled``, nested groups in the Zarr hierarchy) and its provenance has a ``teachers`` list, one record per
teacher with its ``label`` and input ``resolution``. Every later stage names a cache tap the same way
(``kdep fit-svd CACHE --tap vit/pooled``). A label defaults to the model name without its library prefix and
pretrained tag (``timm:vit_base_patch14_dinov2.lvd142m`` -> ``vit_base_patch14_dinov2``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.choices import TAPS
from pipeline.manifest import ConfigError

LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher of a cache run: its label, model name and weights, and the taps cached from it."""

    label: str
    arch: str
    weights: str
    taps: tuple[str, ...]


def default_label(arch: str) -> str:
    """The model name without library prefix and pretrained tag: ``timm:convnext_atto.d2_in1k`` -> ``convnext_atto``."""
    return arch.partition(":")[2].split(".")[0] if ":" in arch else arch.split(".")[0]


def parse_teacher(item: str) -> tuple[str, str]:
    """``'LABEL=NAME'`` or ``'NAME'`` -> (label, model name)."""
    label, sep, arch = item.partition("=")
    if not sep:
        label, arch = default_label(item), item
    if not LABEL_RE.fullmatch(label):
        raise ConfigError(
            f"key 'teacher': label {label!r} of {item!r} must be letters, digits, '_', '.' or '-' "
            "(name it: --teacher LABEL=MODEL)"
        )
    return label, arch


def split_tap(name: str) -> tuple[str, str]:
    """A cache tap name -> (teacher label or "", tap): ``vit/pooled`` -> (``vit``, ``pooled``)."""
    label, sep, tap = name.rpartition("/")
    return label, tap


def check_cache_tap(key: str, name: str) -> None:
    """Refuse a cache tap name that is neither ``TAP`` nor ``LABEL/TAP`` (TAP one of :data:`TAPS`)."""
    label, tap = split_tap(name)
    if tap not in TAPS or (label and not LABEL_RE.fullmatch(label)):
        raise ConfigError(
            f"key {key!r}: {name!r} is not a cache tap; use TAP or LABEL/TAP (several teachers) with TAP one of "
            f"{', '.join(TAPS)}"
        )


def teacher_specs(
    teachers: tuple[str, ...], weights: tuple[str, ...], taps: tuple[str, ...]
) -> list[TeacherSpec]:
    """The teachers of a cache run. ``weights``: one per teacher. ``taps``: a plain ``TAP`` is cached from every
    teacher, ``LABEL/TAP`` from that teacher only; each teacher needs at least one."""
    if not teachers:
        raise ConfigError("key 'teacher': name at least one teacher (--teacher resnet50)")
    if len(weights) != len(teachers):
        raise ConfigError(
            f"key 'weights': {len(weights)} given for {len(teachers)} teacher(s); give one --weights per "
            "--teacher, in the same order (random, a library weights name or a file)"
        )
    parsed = [parse_teacher(t) for t in teachers]
    labels = [label for label, _ in parsed]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ConfigError(
            f"key 'teacher': label {repeated[0]!r} names two teachers; name them: --teacher A=MODEL --teacher B=MODEL"
        )
    for t in taps:
        check_cache_tap("taps", t)
        label, _ = split_tap(t)
        if label and label not in labels:
            raise ConfigError(f"key 'taps': {t!r} names no teacher; the teachers are {', '.join(labels)}")
        if label and len(teachers) == 1:
            raise ConfigError(f"key 'taps': {t!r}: with one teacher, name the tap alone ({split_tap(t)[1]})")
    out = []
    for (label, arch), w in zip(parsed, weights, strict=True):
        mine = tuple(dict.fromkeys(split_tap(t)[1] for t in taps if split_tap(t)[0] in ("", label)))
        if not mine:
            raise ConfigError(
                f"key 'taps': no tap for teacher {label!r}; add --tap {label}/pooled (or a plain tap)"
            )
        out.append(TeacherSpec(label, arch, w, mine))
    return out


def cache_tap(label: str, tap: str, several: bool) -> str:
    """The stored name of ``tap`` of teacher ``label``: the tap alone in a single-teacher cache."""
    return f"{label}/{tap}" if several else tap


def teacher_records(provenance: dict) -> list[dict]:
    """Each teacher the cache records, with ``label`` ("" for a single-teacher cache), ``resolution`` (its input
    side) and ``cache_taps`` (its taps as stored), whatever the number of teachers."""
    if "teachers" in provenance:
        return [
            {**t, "cache_taps": [cache_tap(t["label"], x, True) for x in t["taps"]]}
            for t in provenance["teachers"]
        ]
    t = provenance["teacher"]
    return [
        {
            **t,
            "label": "",
            "resolution": provenance["preprocessing"]["resolution"],
            "cache_taps": list(t["taps"]),
        }
    ]


def teacher_of_tap(provenance: dict, name: str) -> dict:
    """The record of the teacher whose stored taps include ``name``."""
    for record in teacher_records(provenance):
        if name in record["cache_taps"]:
            return record
    have = [x for r in teacher_records(provenance) for x in r["cache_taps"]]
    raise ConfigError(f"tap {name!r} is not in this cache; it has {', '.join(have)}")
