"""The process artefact: a searched distillation process (DistPro's alpha_t^{i,j}) as one JSON file.

    from pipeline.process.artefact import alpha_at, kept_pathways, load_process
    process = load_process("out/demo/process/process.json", student_taps=s_taps, teacher_taps=t_taps)
    weights = alpha_at(process, progress=0.25)          # {"t4-s2": 0.07, ...}, sums to 1
    kept = kept_pathways(process, threshold=0.5)        # pathways whose normalised alpha ever reaches 0.5

A pathway ``t{i}-s{j}`` carries teacher stage ``i`` (tap ``stage{i}``, or ``stage{i}_pre`` before its final ReLU
when the process was searched with ``stage_features`` ``pre_relu``) to student stage ``j`` (tap ``stage{j}`` or
``stage{j}_pre``). The file (format ``kdep-process/1``, written by :meth:`Process.save`, atomically)::

    format, pathway_set ("paper" | "reference"), stage_features ("output" | "pre_relu"; absent in older files:
    output), pathways [{name, teacher_stage, student_stage, teacher_tap, student_tap, teacher_dim, student_dim}],
    stages {teacher, student}, transform {kind, detail, loss}, normalisation "softmax",
    alpha {steps [S+1] (0 = before the first update), progress [S+1] = step / S, logits [S+1][P],
           weights [S+1][P] (= softmax(logits), rows sum to 1)},
    epochs [{epoch, step, weights [P]}],         the weights at the end of each search epoch
    losses {steps [S], train [S], val [S]},       the network's train loss and the held-out objective per step
    search {...},                                 every setting of the search (order, lrs, xi rule, objective, ...)
    split {...},                                  the held-out rule, seed, fraction and image counts
    provenance {...}                              cache fingerprint/path, teacher, student, versions, config

**Normalised alpha and the threshold rule.** The appendix (Figs. 2-3) plots "normalised" alphas and Table 3 drops
alphas under a threshold (0.3 keeps 80% of the alphas, 0.5 keeps 50%, 0.7 keeps 26%), so a threshold acts on a
value in [0, 1] per (step, pathway) and dropping is per step. Here the normalised alpha of pathway p at step t is
``a_t^p / max_q a_t^q`` (the strongest pathway at that step is 1; softmax weights are positive, so no pathway is 0).
Pathway p is *kept at* progress t when its normalised alpha is >= the threshold (:func:`kept_at`);
:func:`kept_pathways` keeps the pathways kept after some search step (the others are dropped for the whole run:
their transform blocks need not be built; the uniform initial row, where every pathway is at 1, does not count), and
:func:`kept_fraction` is the share of the searched (step, pathway) alphas kept, the "Remain alphas (%)" column of
Table 3. Threshold 0 keeps everything. :func:`alpha_at` returns every pathway's
softmax weight unchanged; a trainer that drops pathways should not renormalise the kept weights (the searched
weights keep their scale).

**Retrain weight scale** (:func:`weight_rows`). ``softmax``: the searched softmax(alpha), each row summing to 1.
``reference``: the scale of the official code's retrain (``alpha_normalization_style 333`` with kd_weight 1):
w_p = P * exp(a_p) / (sum_q exp(a_q) + e), a softmax over the P logits and one more fixed at 1, times P. Its rows
sum to P * S / (S + e) with S = sum_q exp(a_q) (10 pathways at alpha = 1, the official initial value: 9.09); the
ratios between pathways, so the normalised alpha and the threshold, are the same as softmax's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.choices import PATHWAY_SETS as PATHWAY_SETS  # named in pipeline.choices (torch-free, --help)
from pipeline.errors import KdepError
from pipeline.files import write_json_atomic

FORMAT = "kdep-process/1"
STAGE_FEATURES = ("output", "pre_relu")  # named in pipeline.choices too (torch-free --help)


class ProcessError(KdepError):
    """A process file is missing or malformed, or its pathways do not fit a student / teacher pair."""


def pathway_pairs(stages: int, pathway_set: str = "paper") -> list[tuple[int, int]]:
    """``[(teacher stage i, student stage j)]`` in a fixed order.

    ``paper``: 1 <= j <= i <= N, the appendix's notation (Fig. 2: i teacher, j student; "5-3, 5-4, 5-5" are the
    deepest teacher stage into student stages 3..5). ``reference``: 1 <= i <= j <= N, what the public code's
    ``Distiller`` builds (a student stage feeds the teacher stages at or below it, ReviewKD style). N = 4: 10 each.
    """
    if pathway_set == "paper":
        return [(i, j) for i in range(1, stages + 1) for j in range(1, i + 1)]
    if pathway_set == "reference":
        return [(i, j) for i in range(1, stages + 1) for j in range(i, stages + 1)]
    raise ProcessError(f"pathway set {pathway_set!r}; use one of {', '.join(PATHWAY_SETS)}")


def pathway_name(teacher_stage: int, student_stage: int) -> str:
    return f"t{teacher_stage}-s{student_stage}"


def stage_tap(stage: int, features: str = "output") -> str:
    """``stageK``, or ``stageK_pre`` (the stage before its final ReLU) for ``features="pre_relu"``."""
    if features not in STAGE_FEATURES:
        raise ProcessError(f"stage features {features!r}; use one of {', '.join(STAGE_FEATURES)}")
    return f"stage{stage}_pre" if features == "pre_relu" else f"stage{stage}"


def stage_count(taps: Sequence[str], features: str = "output") -> int:
    """How many of ``stage1, stage2, ...`` (or ``stage1_pre, ...``) are in ``taps`` without a gap (-> 4)."""
    n = 0
    while stage_tap(n + 1, features) in taps:
        n += 1
    return n


@dataclass(frozen=True)
class Pathway:
    """One teacher-stage -> student-stage pathway with its widths (channels or pooled D)."""

    teacher_stage: int
    student_stage: int
    teacher_dim: int
    student_dim: int
    features: str = "output"  # stage outputs, or stages before their final ReLU (pre_relu)

    @property
    def name(self) -> str:
        return pathway_name(self.teacher_stage, self.student_stage)

    @property
    def teacher_tap(self) -> str:
        return stage_tap(self.teacher_stage, self.features)

    @property
    def student_tap(self) -> str:
        return stage_tap(self.student_stage, self.features)

    def to_dict(self) -> dict:
        return {"name": self.name, "teacher_stage": self.teacher_stage, "student_stage": self.student_stage,
                "teacher_tap": self.teacher_tap, "student_tap": self.student_tap,
                "teacher_dim": self.teacher_dim, "student_dim": self.student_dim}  # fmt: skip


def make_pathways(teacher_dims: dict[str, int], student_dims: dict[str, int], pathway_set: str = "paper",
                  features: str = "output") -> list[Pathway]:  # fmt: skip
    """The pathways between ``stage1..stageN`` (``stage1_pre..``) of both sides; refused when the counts differ."""
    n_t, n_s = stage_count(list(teacher_dims), features), stage_count(list(student_dims), features)
    if n_t == 0 or n_t != n_s:
        names = "stage1_pre..stageN_pre" if features == "pre_relu" else "stage1..stageN"
        raise ProcessError(
            f"the teacher has {n_t} stage taps and the student {n_s}; DistPro's pathways need the same number "
            f"of stages on both sides ({names})"
        )
    return [
        Pathway(i, j, teacher_dims[stage_tap(i, features)], student_dims[stage_tap(j, features)], features)
        for i, j in pathway_pairs(n_t, pathway_set)
    ]


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (what the search applies to alpha)."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


@dataclass
class Process:
    """A searched process: pathways, alpha per step, and everything needed to trust and reuse it."""

    pathways: list[dict]  # Pathway.to_dict() records, in alpha's column order
    logits: np.ndarray  # (S + 1, P) alpha before the softmax; row 0 is the initial value
    pathway_set: str = "paper"
    stage_features: str = "output"  # output or pre_relu: which stage taps the pathways carry
    transform: dict = field(default_factory=dict)  # {"kind": ..., "detail": ...}
    stages: dict = field(default_factory=dict)  # {"teacher": N, "student": N}
    epochs: list[dict] = field(default_factory=list)  # [{"epoch", "step", "weights"}]
    losses: dict = field(default_factory=dict)  # {"steps", "train", "val"}
    search: dict = field(default_factory=dict)
    split: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [p["name"] for p in self.pathways]

    @property
    def steps(self) -> int:
        """S, the number of alpha updates."""
        return int(self.logits.shape[0]) - 1

    @property
    def weights(self) -> np.ndarray:
        """(S + 1, P) softmax(alpha) per step; rows sum to 1."""
        return softmax_rows(self.logits)

    @property
    def progress(self) -> np.ndarray:
        """(S + 1,) the training progress each row stands for: step / S (a single row stands for all of it)."""
        return np.arange(self.steps + 1) / max(self.steps, 1)

    def to_dict(self) -> dict[str, Any]:
        w = self.weights
        return {
            "format": FORMAT, "pathway_set": self.pathway_set, "stage_features": self.stage_features,
            "pathways": self.pathways,
            "stages": self.stages, "transform": self.transform, "normalisation": "softmax",
            "alpha": {"steps": list(range(self.steps + 1)), "progress": self.progress.tolist(),
                      "logits": self.logits.tolist(), "weights": w.tolist()},
            "epochs": self.epochs, "losses": self.losses, "search": self.search, "split": self.split,
            "provenance": self.provenance,
        }  # fmt: skip

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.to_dict())
        return path


def read_process(path: str | Path) -> Process:
    """Read and check a process file (format, pathways, alpha shapes, finite values, rows of weights summing to 1)."""
    path = Path(path)
    if not path.is_file():
        raise ProcessError(f"no process file at {path}; run `kdep search-process` first")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ProcessError(f"{path} is not a readable JSON process file ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else None
        raise ProcessError(f"{path}: format {got!r} is not {FORMAT!r}; re-run `kdep search-process`")
    try:
        pathways, alpha = list(data["pathways"]), data["alpha"]
        logits = np.asarray(alpha["logits"], np.float64)
    except (KeyError, TypeError, ValueError) as err:
        raise ProcessError(
            f"{path}: missing or malformed field ({err}); re-run `kdep search-process`"
        ) from None
    _check_alpha(path, pathways, logits, np.asarray(alpha.get("weights", []), np.float64))
    keep = ("pathway_set", "stage_features", "transform", "stages", "epochs", "losses", "search", "split",
            "provenance")  # fmt: skip
    return Process(pathways=pathways, logits=logits, **{k: data[k] for k in keep if k in data})


def _check_alpha(path: Path, pathways: list[dict], logits: np.ndarray, weights: np.ndarray) -> None:
    names = [p.get("name") for p in pathways]
    if not names or len(set(names)) != len(names):
        raise ProcessError(f"{path}: pathway names {names} are empty or repeated")
    if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] != len(names):
        raise ProcessError(
            f"{path}: alpha logits have shape {logits.shape}, expected (steps + 1, {len(names)} pathways)"
        )
    if not np.isfinite(logits).all():
        raise ProcessError(f"{path}: alpha logits hold NaN or inf; the search diverged, re-run it")
    if weights.shape != logits.shape or not np.allclose(weights, softmax_rows(logits), atol=1e-9):
        raise ProcessError(f"{path}: alpha weights are not the softmax of its logits; the file was edited")


def check_fits(
    process: Process, student_taps: Sequence[str], teacher_taps: Sequence[str], where: str = ""
) -> None:
    """Refuse (one line) a process whose pathways do not exist for this pair: the stage counts must equal the
    searched ones and every pathway's taps must be present. Widths may differ: the appendix transfers a process
    between architectures with the same pathways (Table 1), and the transform blocks are rebuilt for the new pair."""
    where = where or "the process"
    features = process.stage_features
    n_s, n_t = stage_count(student_taps, features), stage_count(teacher_taps, features)
    want = process.stages or {}
    if (n_t, n_s) != (want.get("teacher"), want.get("student")):
        kind = " pre-ReLU (stageK_pre)" if features == "pre_relu" else ""
        raise ProcessError(
            f"{where} was searched for {want.get('teacher')} teacher and {want.get('student')} student{kind} "
            f"stages; this pair has {n_t} and {n_s}: search a process for it (kdep search-process)"
        )
    for p in process.pathways:
        if p["student_tap"] not in student_taps or p["teacher_tap"] not in teacher_taps:
            raise ProcessError(
                f"{where}: pathway {p['name']} needs student tap {p['student_tap']} and teacher tap "
                f"{p['teacher_tap']}, which this pair lacks"
            )


def load_process(
    path: str | Path, student_taps: Sequence[str] | None = None, teacher_taps: Sequence[str] | None = None
) -> Process:
    """:func:`read_process`, then :func:`check_fits` when the pair's taps are given."""
    process = read_process(path)
    if student_taps is not None and teacher_taps is not None:
        check_fits(process, student_taps, teacher_taps, str(path))
    return process


def _check_progress(progress: float) -> float:
    if not (isinstance(progress, (int, float)) and math.isfinite(progress) and 0.0 <= progress <= 1.0):
        raise ProcessError(f"training progress {progress!r} must be in [0, 1] (step / total steps)")
    return float(progress)


def _weights_at(process: Process, progress: float) -> np.ndarray:
    """(P,) the softmax weights linearly interpolated between the two search steps around ``progress``."""
    x, w = process.progress, process.weights
    if len(x) == 1:
        return w[0]
    return np.array([np.interp(_check_progress(progress), x, w[:, p]) for p in range(w.shape[1])])


def alpha_at(process: Process, progress: float) -> dict[str, float]:
    """``{pathway: weight}`` at training progress in [0, 1]: search step s stands for progress s / S, and the
    softmax weights are interpolated linearly in between (a convex mix of two rows of the simplex: sums to 1)."""
    return dict(zip(process.names, _weights_at(process, progress).tolist(), strict=True))


def normalised(process: Process) -> np.ndarray:
    """(S + 1, P) alpha / the largest alpha of the same step: the values the threshold is compared with."""
    w = process.weights
    return w / w.max(axis=1, keepdims=True)


def weight_rows(process: Process, scale: str = "softmax") -> np.ndarray:
    """(S + 1, P) pathway weights per search step at the retrain's ``scale`` (module docstring): ``softmax``
    (= :attr:`Process.weights`) or ``reference``, P * exp(a_p) / (sum_q exp(a_q) + e), computed stably."""
    if scale == "softmax":
        return process.weights
    if scale != "reference":
        raise ProcessError(f"process weight scale {scale!r}; use softmax or reference")
    z = np.asarray(process.logits, np.float64)
    top = np.maximum(z.max(axis=1, keepdims=True), 1.0)
    e = np.exp(z - top)
    return z.shape[1] * e / (e.sum(axis=1, keepdims=True) + np.exp(1.0 - top))


def _check_threshold(threshold: float) -> float:
    if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise ProcessError(f"alpha threshold {threshold!r} must be in [0, 1] (a normalised alpha)")
    return float(threshold)


def kept_at(process: Process, progress: float, threshold: float) -> list[str]:
    """Pathways whose normalised alpha at ``progress`` (interpolated) is >= ``threshold``."""
    w = _weights_at(process, progress)
    t = _check_threshold(threshold)
    return [n for n, v in zip(process.names, w / w.max(), strict=True) if v >= t]


def searched_rows(process: Process) -> np.ndarray:
    """(S, P) normalised alphas of the search's updates: row 0, the uniform initial value (every pathway at 1),
    is left out when there are updates, or it would keep every pathway."""
    rows = normalised(process)
    return rows[1:] if process.steps else rows


def kept_pathways(process: Process, threshold: float) -> list[str]:
    """Pathways whose normalised alpha is >= ``threshold`` after some search step (in pathway order); the others
    are below it throughout and are dropped for the whole run."""
    t = _check_threshold(threshold)
    reach = searched_rows(process).max(axis=0)
    return [n for n, v in zip(process.names, reach, strict=True) if v >= t]


def kept_fraction(process: Process, threshold: float) -> float:
    """Share of the (step, pathway) alphas with normalised alpha >= ``threshold`` (Table 3's "Remain alphas")."""
    return float((searched_rows(process) >= _check_threshold(threshold)).mean())
