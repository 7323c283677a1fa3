"""KDEP's loss weight w (loss = w * MSE) chosen from the cache's teacher record: the KDEP supplement's Table S.3.

    from pipeline.student.loss_weight import resolve_loss_weight
    chosen = resolve_loss_weight(0.0, [teacher_record])    # 0 = auto
    chosen.value, chosen.rule                              # 20.0, "auto: teacher resnet50 (...) is ... -> w = 20"

Table S.3 ("Value of loss weight w for different T-S pairs"): standard supervised (SP) R50 -> R18: 20; MS R50 ->
R18: 3; SWSL R50 -> R18: 1; MEAL V2 R50 -> R18: 1; Swin-B -> R18: 3; MS R50 -> MNV2: 3. The supplement (B.1) sets w
so that the feature loss matches the scale of supervised pre-training's loss; the table's one MNV2 row has its R18
row's value, so the rule here follows the teacher only.

Recognised from a teacher record (``weights`` identity, as ``kdep cache-teacher`` records it):

- standard SP R50 (w = 20): torchvision ``ResNet50_Weights.IMAGENET1K_V1`` / ``IMAGENET1K_V2``, and timm's copies of
  them ``resnet50.tv_in1k`` / ``resnet50.tv2_in1k``;
- SWSL R50 (w = 1): timm ``resnet50.fb_swsl_ig1b_ft_in1k``;
- Swin-B (w = 3): timm ``swin_base_patch4_*``.

MS R50 (Microsoft Vision, pypi ``microsoftvision``) and MEAL V2 arrive as weights files, which do not say what they
are; they, and every teacher the table does not list, get :data:`DEFAULT_WEIGHT` = 3 (the MS R50 and Swin-B value)
with a one-line note saying so. A given value (> 0) is used as it is. Torch-free: the stage resolves w before it
builds anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.manifest import ConfigError

DEFAULT_WEIGHT = 3.0  # teachers Table S.3 does not list: its MS R50 -> R18/MNV2 and Swin-B -> R18 value
STANDARD_R50 = "standard SP R50"
TABLE_S3 = {STANDARD_R50: 20.0, "MS R50": 3.0, "SWSL R50": 1.0, "MEAL V2 R50": 1.0, "Swin-B": 3.0}
STANDARD_R50_WEIGHTS = {
    ("torchvision", "ResNet50_Weights.IMAGENET1K_V1"), ("torchvision", "ResNet50_Weights.IMAGENET1K_V2"),
    ("timm", "resnet50.tv_in1k"), ("timm", "resnet50.tv2_in1k"),
}  # fmt: skip


@dataclass(frozen=True)
class LossWeight:
    """The w a run uses and how it was chosen (both recorded in provenance.json)."""

    value: float
    rule: str  # one line: "given", or "auto: <teacher> is <row> -> w = <value>"
    note: str = ""  # a line for the user when auto met a teacher the table does not list, else ""


def table_row(record: dict) -> str | None:
    """The Table S.3 teacher row a cache's teacher record is, or None when the table does not list it."""
    identity = record.get("weights") or {}
    kind, name = identity.get("kind", ""), identity.get("name", "")
    if (kind, name) in STANDARD_R50_WEIGHTS:
        return STANDARD_R50
    if kind == "timm" and name == "resnet50.fb_swsl_ig1b_ft_in1k":
        return "SWSL R50"
    if kind == "timm" and name.startswith("swin_base_patch4_"):
        return "Swin-B"
    return None


def teacher_name(record: dict) -> str:
    """``resnet50 (ResNet50_Weights.IMAGENET1K_V2)``, with the teacher's label in a multi-teacher cache."""
    identity = record.get("weights") or {}
    label = f"{record['label']}=" if record.get("label") else ""
    return f"{label}{record.get('arch', '?')} ({identity.get('kind', '?')} {identity.get('name', '?')})"


def teacher_weight(record: dict) -> tuple[float, str]:
    """(w, why) for one teacher: its Table S.3 value, or the default for a teacher the table does not list."""
    row = table_row(record)
    if row is None:
        return (
            DEFAULT_WEIGHT,
            f"{teacher_name(record)} is not in Table S.3 -> w = {DEFAULT_WEIGHT:g} (default)",
        )
    return TABLE_S3[row], f"{teacher_name(record)} is Table S.3's {row} -> w = {TABLE_S3[row]:g}"


def resolve_loss_weight(given: float, teachers: list[dict]) -> LossWeight:
    """``given`` > 0 as it is; 0 (auto) from the records of the teachers the run's targets come from (one value
    for all of them, or a one-line error asking for an explicit weight)."""
    if given > 0:
        return LossWeight(float(given), "given")
    if not teachers:  # no target's tap is in the cache: the run stops on that (naming the tap) right after
        return LossWeight(DEFAULT_WEIGHT, f"auto: no teacher record -> w = {DEFAULT_WEIGHT:g} (default)")
    chosen = {teacher_name(r): teacher_weight(r) for r in teachers}
    values = {w for w, _ in chosen.values()}
    if len(values) != 1:
        each = ", ".join(f"{name}: {w:g}" for name, (w, _) in chosen.items())
        raise ConfigError(
            f"key 'loss_weight': auto (0) finds different Table S.3 weights for the targets' teachers ({each}); "
            "set --loss-weight and balance the targets with --target-weights"
        )
    value = values.pop()
    rule = "auto: " + "; ".join(why for _, why in chosen.values())
    uncovered = list(dict.fromkeys(teacher_name(r) for r in teachers if table_row(r) is None))
    note = (
        f"loss_weight auto: {', '.join(uncovered)} is not in the KDEP supplement's Table S.3; using w = "
        f"{value:g} (its MS R50 / Swin-B value); pass --loss-weight to choose another"
        if uncovered
        else ""
    )
    return LossWeight(value, rule, note)
