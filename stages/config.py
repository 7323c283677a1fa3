"""Every stage's settings: typed, frozen dataclasses, the single source of defaults.

One field = one manifest key (``<section>.<field>``), one ``--set section.field=value`` override and one CLI flag
(``--field-name``), all generated from the field itself: its type, its default, its trailing comment as the help
text, and its choices (``CHOICES``) where the config validates them. Nothing here imports torch, zarr or dask, so
``kdep --help`` and a config error answer instantly. ``__post_init__`` names the key, the bad value and the range.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from pipeline.choices import (
    AMP_MODES,
    CENTER_VIEWS,
    COSS_HEADS,
    DEVICES,
    EVAL_TAPS,
    FEATURE_DTYPES,
    HYPERGRADIENTS,
    LOSSES,
    LR_SCHEDULES,
    OUT_OF_RANGE,
    PATHWAY_LOSSES,
    PATHWAY_SETS,
    PROBE_BACKENDS,
    PROCESS_WEIGHTS,
    PROJECTION_METHODS,
    PROJECTION_TRANSFORMS,
    SCALE_BENCHES,
    SEARCH_LR_SCHEDULES,
    SEARCH_MODES,
    SEARCH_OBJECTIVES,
    SEARCH_TRANSFORMS,
    STAGE_FEATURES,
    TAPS,
    VIEW_POLICIES,
    VIEW_RECIPES,
)
from pipeline.evaluation.backbones import EvalError, parse_backbone
from pipeline.manifest import ConfigError, check_choice, check_choices, check_range
from pipeline.teachers import check_cache_tap, teacher_specs

DEMO_CLASSES = 10  # classes the demo generator can paint (pipeline.demo.shards.CLASS_NAMES)


def _check_device(value: str) -> None:
    check_choice("device", value.split(":")[0], DEVICES)


@dataclass(frozen=True)
class DemoDataConfig:
    out: str = "out/demo/data"  # output folder (train/ and val/ are made inside)
    seed: int = 0  # base seed: the same seed gives byte-identical shards
    classes: int = 10  # number of classes, 1..10
    train_per_class: int = 60  # train images per class
    val_per_class: int = 20  # held-out images per class
    per_shard: int = 100  # samples per shard

    def __post_init__(self) -> None:
        check_range("classes", self.classes, 1, DEMO_CLASSES)
        check_range("train_per_class", self.train_per_class, 1)
        check_range("val_per_class", self.val_per_class, 1)
        check_range("per_shard", self.per_shard, 1)


@dataclass(frozen=True)
class MakeShardsConfig:
    from_folder: str = ""  # ImageFolder root: <root>/<class>/<image>
    out: str = ""  # output shard folder
    per_shard: int = 1000  # samples per shard (ImageNet: ~1000 gives ~110 MB shards)
    fraction: float = 1.0  # fraction of the images of every class to keep, (0, 1]
    seed: int = 0  # seeds the subset choice and the sample order
    skip_bad: bool = False  # skip unreadable images (counted and listed) instead of stopping
    prefix: str = "train"  # shard name prefix
    workers: int = -1  # processes writing shards (-1 = the available cores; 0 or 1 = in this process)

    def __post_init__(self) -> None:
        if not self.from_folder or not self.out:
            raise ConfigError("keys 'from_folder' and 'out' are required (--from-folder DIR --out OUTDIR)")
        check_range("per_shard", self.per_shard, 1)
        check_range("fraction", self.fraction, 0.0, 1.0, open_lo=True)
        check_range("workers", self.workers, -1, 1024)


@dataclass(frozen=True)
class DemoTeacherConfig:
    train: str = "out/demo/data/train"  # labelled shards to train on
    out: str = "out/demo/teacher-r18.pt"  # the teacher's state dict
    arch: str = "resnet18"  # torchvision model name
    epochs: int = 30  # supervised epochs
    batch_size: int = 32  # images per step
    lr: float = 0.05  # peak SGD learning rate (cosine schedule)
    resolution: int = 64  # training view side in pixels
    seed: int = 0  # init and views
    device: str = "cpu"  # cpu, auto, cuda or cuda:N (cpu: the demo's teacher is the same on every machine)
    quiet: bool = False  # no progress bar

    def __post_init__(self) -> None:
        if not self.train or not self.out:
            raise ConfigError("keys 'train' and 'out' are required")
        _check_device(self.device)
        check_range("epochs", self.epochs, 1)
        check_range("batch_size", self.batch_size, 2)
        check_range("lr", self.lr, 0.0, open_lo=True)


@dataclass(frozen=True)
class CacheTeacherConfig:
    CHOICES: ClassVar[dict] = {
        "recipe": VIEW_RECIPES,
        "dtype": FEATURE_DTYPES,
        "amp": AMP_MODES,
        "center_recipe": CENTER_VIEWS,
        "out_of_range": OUT_OF_RANGE,
    }
    shards: str = ""  # brace pattern, shard directory or index.json
    out: str = ""  # the cache folder to create or resume (its store.zarr is the Zarr hierarchy)
    teacher: tuple[str, ...] = ("resnet50",)  # model(s): NAME, tv:NAME or timm:NAME; several: LABEL=NAME each
    weights: tuple[str, ...] = ("IMAGENET1K_V2",)  # one per teacher: library weights name/tag, a file, random
    taps: tuple[str, ...] = ("pre_relu",)  # pre_relu (KDEP), post_relu, pooled, stageK, or LABEL/TAP
    views: int = 10  # K views cached per image
    recipe: str = "paper"  # view recipe
    center_view: bool = False  # view 0 is the deterministic centre view (neighbour mining, evaluation)
    center_recipe: str = "center"  # center (0.875 crop, bilinear) or center-coss (CoSS: 224/235, bicubic)
    resolution: int = 224  # view side in pixels (every teacher's input); 0 = each teacher's own
    teacher_resolution: tuple[int, ...] = ()  # one per teacher, overriding resolution (0: the teacher's own)
    mean: tuple[float, ...] = ()  # override the teacher's mean (default: its library's; one teacher only)
    std: tuple[float, ...] = ()  # override the teacher's std (default: its library's; one teacher only)
    seed: int = 0  # base seed of the view parameters
    dtype: str = "float16"  # stored feature dtype
    out_of_range: str = "error"  # float16 overflow or a row below its normal range: stop, or skip the image
    batch_size: int = 256  # views per teacher forward
    workers: int = (
        -1
    )  # DataLoader worker processes per rank (0 = in the main process, -1 = the CPU cores per rank minus one)
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    amp: str = "auto"  # autocast: auto = bf16 on CUDA; CPU always runs float32
    channels_last: bool = True  # channels_last memory format on CUDA
    skip_bad: bool = False  # skip undecodable images / duplicate keys (counted, listed in the markers)
    quiet: bool = False  # no progress bar or banner

    def __post_init__(self) -> None:
        if not self.shards or not self.out:
            raise ConfigError("keys 'shards' and 'out' are required (--shards PATTERN --out STORE)")
        for name in ("teacher", "weights"):  # one name given directly (not through the CLI or a manifest)
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, (getattr(self, name),))
        check_choices(self)
        if not self.taps or len(set(self.taps)) != len(self.taps):
            raise ConfigError(
                f"key 'taps': {list(self.taps)!r} must name one or more of {', '.join(TAPS)}, without repeats"
            )
        teacher_specs(self.teacher, self.weights, self.taps)  # labels, weights and taps fit together
        if len(self.teacher) > 1 and (self.mean or self.std):
            raise ConfigError("keys 'mean'/'std' override one teacher's normalisation; cache it alone")
        check_range("views", self.views, 1, 1000)
        for res in (self.resolution, *self.teacher_resolution):
            if res:
                check_range("resolution", res, 16, 1024)
        if self.teacher_resolution and len(self.teacher_resolution) != len(self.teacher):
            raise ConfigError(
                f"key 'teacher_resolution': {len(self.teacher_resolution)} given for {len(self.teacher)} "
                "teacher(s); give one per --teacher, in the same order (0 = that teacher's own)"
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value and (len(value) != 3 or (name == "std" and min(value) <= 0)):
                extra = ", each > 0" if name == "std" else ""
                raise ConfigError(f"key {name!r}: {list(value)!r} must be 3 values (R, G, B){extra}")
        check_range("batch_size", self.batch_size, 1)
        check_range("workers", self.workers, -1, 64)
        _check_device(self.device)


@dataclass(frozen=True)
class FitSvdConfig:
    CHOICES: ClassVar[dict] = {"method": PROJECTION_METHODS, "transform": PROJECTION_TRANSFORMS}
    cache: str = ""  # feature cache folder written by `kdep cache-teacher`
    out: str = ""  # output .npz; manifest, plots and config.fit_svd.json are written beside it
    dim: int = 0  # D_s, the student feature width (ResNet-18: 512, MobileNetV2: 1280), 1..D_t
    method: str = "svd"  # projection method
    transform: str = "pts"  # transform after the projection (sm = sm-linear)
    pts_t: float = 0.1  # PTS temperature T > 0
    pts_n: float = 3.0  # PTS root n > 0
    tap: str = "pre_relu"  # cached feature tap to fit on (LABEL/TAP in a multi-teacher cache)
    views: tuple[int, ...] = ()  # view indices to use (repeat the flag or 0,1); empty = all K
    fraction: float = 1.0  # fraction of the images (cache rows) to fit on, (0, 1]: exact, seeded subset
    seed: int = 0  # seeds the image fraction and cs-rand
    allow_partial: bool = False  # fit on the done shards of an unfinished cache (recorded)
    scheduler: str = ""  # "" = local threaded dask; tcp://host:8786 = a dask.distributed scheduler
    lanes: int = 0  # slots read at once (local threads, ~0.25 GiB each at ImageNet shape); 0 = auto: the
    # usable cores, capped by free memory; on a cluster: at most this many of its worker threads (0 = all)
    quiet: bool = False  # no banner, no progress bars

    def __post_init__(self) -> None:
        if not self.cache or not self.out:
            raise ConfigError(
                "keys 'cache' and 'out' are required (kdep fit-svd CACHE --dim 512 --out proj.npz)"
            )
        if not self.out.endswith(".npz"):
            raise ConfigError(f"key 'out': {self.out!r} must end in .npz (e.g. --out proj-r18.npz)")
        if self.dim == 0:
            raise ConfigError(
                "key 'dim': set the student width D_s >= 1 (e.g. --dim 512 for ResNet-18), got 0"
            )
        check_range("dim", self.dim, 1)
        check_choices(self)
        check_cache_tap("tap", self.tap)
        check_range("pts_t", self.pts_t, 0.0, open_lo=True)
        check_range("pts_n", self.pts_n, 0.0, open_lo=True)
        check_range("fraction", self.fraction, 0.0, 1.0, open_lo=True)
        for v in self.views:
            check_range("views", v, 0)
        if len(set(self.views)) != len(self.views):
            raise ConfigError(f"key 'views': {list(self.views)} repeats a view; list each view once")
        if self.scheduler and "://" not in self.scheduler:
            raise ConfigError(f"key 'scheduler': {self.scheduler!r} is not an address like tcp://host:8786")
        check_range("lanes", self.lanes, 0)


@dataclass(frozen=True)
class TrainStudentConfig:
    CHOICES: ClassVar[dict] = {"loss": LOSSES, "student_tap": TAPS, "view_policy": VIEW_POLICIES,
                               "amp": AMP_MODES, "coss_head": COSS_HEADS, "lr_schedule": LR_SCHEDULES,
                               "process_weights": PROCESS_WEIGHTS}  # fmt: skip
    cache: str = ""  # feature cache folder written by `kdep cache-teacher`
    projection: tuple[
        str, ...
    ] = ()  # projection(s) from fit-svd, one per student (optional for coss/linear-*); several targets: a,b per student
    student: tuple[str, ...] = ("resnet18",)  # torchvision model name(s); several train in one data pass
    out: str = ""  # run folder
    shards: str = ""  # source shards, if they moved since caching (default: the cache's recorded source)
    tap: str = "pre_relu"  # cached teacher tap paired with the views (a multi-teacher cache: LABEL/TAP)
    student_tap: str = "pre_relu"  # student feature tap (KDEP: pre_relu; CoSS: post_relu)
    targets: tuple[str, ...] = ()  # STUDENT_TAP=CACHE_TAP each (multi-layer KD); empty = student_tap=tap
    target_weights: tuple[float, ...] = ()  # w_i of each target's loss, in target order; empty = all 1.0
    loss: str = "kdep"  # distillation loss
    loss_weight: float = 0.0  # w in w * MSE (kdep, linear-*, distpro); 0 = auto from the cache's teacher
    # record by the KDEP supplement's Table S.3: 20 for a standard supervised ResNet-50 (torchvision
    # IMAGENET1K_V1/V2, timm resnet50.tv_in1k/tv2_in1k), 1 for SWSL ResNet-50, 3 for Swin-B, and 3 (the table's
    # MS R50 value) with a one-line note for a teacher it does not list; the value used goes to provenance.json
    coss_l0: float = 1.0  # CoSS feature-similarity weight
    coss_l1: float = 1.0  # CoSS space-similarity weight
    coss_tau_t: float = 0.07  # CoSS teacher temperature
    coss_tau_s: float = 0.1  # CoSS student temperature
    coss_head: str = "mlp"  # CoSS head if D_s != D_t: mlp (reference: Linear-ReLU-Linear) or mlp-bn (+BN)
    neighbours: int = 0  # CoSS neighbour-mined batches: neighbours per anchor (CoSS: 15); 0 = stream order
    neighbour_pool: int = 31  # draw them from each anchor's top-N cosine neighbours (centre view 0)
    anchors: int = 16  # anchors per batch (batch = anchors x (1 + neighbours), replacing batch_size)
    epochs: int = 90  # passes over the data
    batch_size: int = 512  # images per rank and step (unused when global_batch_size is set)
    global_batch_size: int = 0  # images per step over all ranks (per rank: this / ranks; with neighbours the anchors per rank are this / ranks / (1 + neighbours)); 0 = batch_size per rank
    lr: float = 0.0  # 0 = base lr (0.3 ResNet, 0.1 MobileNetV2) x global batch / 512; a given lr is used as is at any global batch
    weight_decay: float = -1.0  # < 0 = from the supplement's table by data_fraction and epochs
    lr_schedule: str = "step"  # step: /10 at 1/3 and 2/3 of training (KDEP); cosine: per epoch; cosine-coss:
    # CoSS's reference code (the base lr flat for epochs 0-4, then the same per-epoch cosine)
    data_fraction: float = 0.1  # fraction of ImageNet the shards hold (only for the weight-decay table)
    resolution: int = 0  # student input side; 0 = the teacher's
    view_policy: str = (
        "walk"  # walk: each image walks its K views in a seeded order; random: uniform per epoch
    )
    shuffle_buffer: int = 256  # per-worker shuffle buffer (samples)
    views_used: int = 0  # train on the first k views of the cache (a k-view cache); 0 = all K
    seed: int = 0  # student init, shard order, view schedule, shuffle
    workers: int = (
        -1
    )  # DataLoader workers per rank (0 = in the main process, -1 = the CPU cores per rank minus one)
    prefetch_factor: int = 4  # batches each worker keeps ready (/dev/shm holds about workers x this batches)
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    amp: str = "auto"  # autocast: auto = bf16 on CUDA; CPU always runs float32
    channels_last: bool = True  # channels_last on CUDA
    online_teacher: bool = False  # run the teacher live on the same views instead of reading the cache
    fresh_views: bool = False  # with online_teacher: a fresh view of every image every epoch, drawn from the cache's recipe and seed outside its pool (true online KD)
    process: str = ""  # DistPro process.json (search-process): its pathways are the targets, by alpha(t)
    alpha_threshold: float = 0.0  # with process: drop a pathway while its normalised alpha is below it
    process_weights: str = "softmax"  # with process: softmax = the searched softmax(alpha), summing to 1;
    # reference = the official retrain's scale, P exp(a_p) / (sum_q exp(a_q) + e) (P pathways; sums to ~9 for 10)
    skip_bad: bool = False  # count and skip samples that do not join the cache
    max_steps: int = 0  # stop each epoch after this many steps (0 = whole epoch; for benchmarks)
    log_every: int = 10  # steps between metrics records
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch is always saved)
    quiet: bool = False  # no progress bar

    def __post_init__(self) -> None:
        if not self.cache or not self.out:
            raise ConfigError("keys 'cache' and 'out' are required (--cache STORE --out RUN_DIR)")
        check_choices(self)
        check_tap_name("tap", self.tap)
        self._check_process()
        self._check_targets()
        self._check_projections()
        check_range("neighbours", self.neighbours, 0)
        if self.neighbours > self.neighbour_pool:
            raise ConfigError(
                f"key 'neighbours': {self.neighbours} cannot be drawn from neighbour_pool {self.neighbour_pool}"
            )
        check_range("anchors", self.anchors, 1)
        check_range("epochs", self.epochs, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("global_batch_size", self.global_batch_size, 0)
        if self.fresh_views and not self.online_teacher:
            raise ConfigError("key 'fresh_views': fresh views have no cached targets; add --online-teacher")
        if self.fresh_views and (self.neighbours or self.views_used):
            given = "neighbours" if self.neighbours else "views_used"
            raise ConfigError(f"key 'fresh_views': not with {given} (neighbour batches and views_used pick cached "
                              "views); leave it 0")  # fmt: skip
        check_range("lr", self.lr, 0.0)
        check_range("loss_weight", self.loss_weight, 0.0)
        check_range("data_fraction", self.data_fraction, 0.0, 1.0, open_lo=True)
        check_range("resolution", self.resolution, 0, 1024)
        check_range("workers", self.workers, -1, 64)
        check_range("prefetch_factor", self.prefetch_factor, 1, 64)
        _check_device(self.device)
        check_range("max_steps", self.max_steps, 0)
        check_range("log_every", self.log_every, 1)
        check_range("checkpoint_every", self.checkpoint_every, 1)
        for name in ("coss_tau_t", "coss_tau_s"):
            check_range(name, getattr(self, name), 0.0, open_lo=True)

    def _check_process(self) -> None:
        """A process brings its own targets, weights and transform blocks, for the distpro loss only."""
        check_range("alpha_threshold", self.alpha_threshold, 0.0, 1.0)
        if self.loss == "distpro" and not self.process:
            raise ConfigError("key 'loss': distpro trains on a searched process; pass --process process.json "
                              "(kdep search-process)")  # fmt: skip
        if self.process_weights != "softmax" and not self.process:
            raise ConfigError(f"key 'process_weights': {self.process_weights!r} weights a process's pathways; pass "
                              "--process process.json (kdep search-process) or leave it at softmax")  # fmt: skip
        if not self.process:
            return
        if self.loss != "distpro":
            raise ConfigError(f"key 'process': a process trains with --loss distpro (its transform blocks and MSE), "
                              f"not {self.loss!r}")  # fmt: skip
        given = [k for k in ("targets", "target_weights", "projection") if getattr(self, k)]
        if given:
            raise ConfigError(f"key {given[0]!r}: a process names the targets, their weights and needs no "
                              "projection; leave targets, target_weights and projection empty")  # fmt: skip

    def _check_targets(self) -> None:
        """Targets parse as STUDENT_TAP=CACHE_TAP, once each; weights and projection lists match their count."""
        if self.targets and (self.tap, self.student_tap) != ("pre_relu", "pre_relu"):
            raise ConfigError(
                f"keys 'tap'/'student_tap' ({self.tap!r}, {self.student_tap!r}) are not used when 'targets' is "
                f"set; name the pair in targets instead (e.g. --targets {self.student_tap}={self.tap})"
            )
        pairs = self.target_pairs
        names = [f"{s}={c}" for s, c in pairs]
        if len(set(names)) != len(names):
            raise ConfigError(f"key 'targets': {names} repeats a target; list each pair once")
        if self.target_weights and len(self.target_weights) != len(pairs):
            raise ConfigError(
                f"key 'target_weights': {len(self.target_weights)} weight(s) for {len(pairs)} target(s) "
                f"({', '.join(names)}); give one per target, in the same order, or none (all 1.0)"
            )
        for w in self.target_weights:
            check_range("target_weights", w, 0.0)

    def _check_projections(self) -> None:
        """One projection per student (kdep, cosine: required), each a comma-separated path per target when there
        are several; or, with several targets, students x targets paths (student-major, e.g. a YAML list)."""
        n, students, given = len(self.target_pairs), len(self.student), len(self.projection)
        if self.loss in ("kdep", "cosine") and not given:
            raise ConfigError(
                f"key 'projection': the {self.loss} loss needs one projection per student "
                f"({students} students, 0 projections); run kdep fit-svd"
            )
        if given and given not in (students, students * n):
            several = f" (each a,b: a path per target) or students x targets = {students * n}" * (n > 1)
            raise ConfigError(
                f"key 'projection': {given} given for {students} student(s); give one per student, in the same "
                f"order{several}"
            )
        names = ", ".join(f"{a}={b}" for a, b in self.target_pairs)
        for student, paths in zip(self.student, self.projection_paths, strict=False):
            if len(paths) != n or not all(paths):
                raise ConfigError(
                    f"key 'projection': {','.join(paths)!r} (student {student}) names {len(paths)} projection(s) "
                    f"for {n} target(s) ({names}); give one comma-separated path per target, in target order "
                    "(kdep fit-svd CACHE --tap CACHE_TAP --dim D for each)"
                )

    @property
    def projection_paths(self) -> tuple[tuple[str, ...], ...]:
        """Per student, one projection path per target (empty when no projection is given)."""
        n, students = len(self.target_pairs), len(self.student)
        if n > 1 and len(self.projection) == students * n:  # students x targets items, student-major
            return tuple(self.projection[i * n : (i + 1) * n] for i in range(students))
        return tuple(tuple(item.split(",")) if n > 1 else (item,) for item in self.projection)

    @property
    def target_pairs(self) -> tuple[tuple[str, str], ...]:
        """``((student_tap, cache_tap), ...)``: the parsed ``targets``, or the one pair (student_tap, tap)."""
        if not self.targets:
            return ((self.student_tap, self.tap),)
        return tuple(parse_target(item) for item in self.targets)

    @property
    def weights(self) -> tuple[float, ...]:
        """One weight per target (``target_weights``, or 1.0 each)."""
        return self.target_weights or (1.0,) * len(self.target_pairs)


def check_tap_name(key: str, name: str) -> None:
    """A cached teacher tap name for stage 3: opaque (the store says which it holds, checked at run time), but never empty and
    without the separators of ``targets`` and ``projection`` lists."""
    if not name or any(c in name for c in "=, ") or name.startswith("/") or name.endswith("/"):
        raise ConfigError(
            f"key {key!r}: {name!r} is not a cache tap name; use a tap the cache holds (kdep inspect CACHE), "
            "e.g. pre_relu or, in a multi-teacher cache, LABEL/pre_relu"
        )


def parse_target(item: str, key: str = "targets") -> tuple[str, str]:
    """``STUDENT_TAP=CACHE_TAP`` -> (student tap, cache tap); the student tap must be one of TAPS."""
    student, sep, cache = item.partition("=")
    if not sep:
        raise ConfigError(
            f"key {key!r}: {item!r} is not STUDENT_TAP=CACHE_TAP (e.g. stage3=stage3, pre_relu=vit/pooled)"
        )
    if student not in TAPS:
        raise ConfigError(f"key {key!r}: student tap {student!r} in {item!r} is not one of {', '.join(TAPS)}")
    check_tap_name(key, cache)
    return student, cache


@dataclass(frozen=True)
class EvalConfig:
    CHOICES: ClassVar[dict] = {"tap": EVAL_TAPS, "agreement_tap": EVAL_TAPS, "agreement_views": VIEW_RECIPES,
                               "probe_backend": PROBE_BACKENDS, "feature_dtype": FEATURE_DTYPES}  # fmt: skip
    train: str = "out/demo/data/train"  # labelled train shards: directory, index.json or brace pattern
    val: str = "out/demo/data/val"  # labelled val shards (never part of the feature cache)
    out: str = "out/demo/eval"  # output folder: results.json, results.png, features/
    backbones: tuple[str, ...] = ()  # name=arch:weights (arch resnet18, timm:NAME; weights random|name|file)
    resolution: int = 224  # side in pixels of the centre view fed to every backbone
    tap: str = "post_relu"  # pooled feature for probe and k-NN
    batch_size: int = 64  # images per forward pass during extraction
    device: str = "cpu"  # cpu or cuda[:N] (bf16 autocast + channels_last on CUDA)
    workers: int = 2  # DataLoader processes decoding views (0 = in the main process; same features)
    seed: int = 0  # seeds random-init backbones, the probe's held-out split and fine-tuning
    cache_features: bool = True  # keep extracted features in OUT/features/ and reuse them
    feature_dtype: str = "float16"  # stored features (memmapped .npy): float16, or float32 if out of range
    probe_cs: tuple[float, ...] = (
        0.01,
        0.1,
        1.0,
        10.0,
    )  # logistic-regression C values swept (one = no sweep)
    probe_holdout: float = 0.2  # fraction of each train class held out to choose C, (0, 1)
    probe_max_iter: int = 1000  # L-BFGS iterations per fit
    probe_backend: str = "torch"  # probe solver: torch (L-BFGS on --device, warm-started) or sklearn (CPU)
    knn_k: int = 20  # neighbours for cosine k-NN
    predictions: bool = False  # also write OUT/predictions.npz (probe and k-NN label per val image)
    finetune_epochs: int = 0  # full fine-tuning epochs per backbone (0 = off; the paper uses 150)
    finetune_lr: float = 0.01  # initial SGD learning rate (paper: 0.01 or 0.001), / 10 at 1/3 and 2/3
    finetune_weight_decay: float = 5e-4  # SGD weight decay (paper: 5e-4)
    finetune_batch_size: int = 64  # images per fine-tuning step (paper: 64)
    teacher: str | None = None  # teacher arch for agreement, e.g. resnet50 (None = no agreement)
    teacher_weights: str | None = None  # teacher weights: file, torchvision enum name, or random
    projection: str | None = (
        None  # projection artefact (fit-svd) mapping teacher (B, D_t) to targets (B, D_s)
    )
    agreement_tap: str = "pre_relu"  # tap compared between student and teacher (KDEP: pre_relu)
    agreement_views: str = "center"  # val views for agreement: center, or a recipe drawn with agreement_seed
    agreement_seed: int = (
        1_000_003  # view seed for non-centre agreement views (keep it unlike the cache seed)
    )

    def __post_init__(self) -> None:
        if not self.train or not self.val or not self.out:
            raise ConfigError("keys 'train', 'val' and 'out' are required (--train DIR --val DIR --out DIR)")
        check_backbones(self.backbones)
        check_range("resolution", self.resolution, 16, 1024)
        check_choices(self)
        check_range("batch_size", self.batch_size, 1)
        check_range("workers", self.workers, 0, 64)
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"key 'device': {self.device!r} is not cpu, cuda or cuda:N")
        if not self.probe_cs:
            raise ConfigError("key 'probe_cs': give at least one C, e.g. --set eval.probe_cs=1.0")
        for c in self.probe_cs:
            check_range("probe_cs", c, 0.0, open_lo=True)
        check_range("probe_holdout", self.probe_holdout, 0.0, 0.9, open_lo=True)
        check_range("probe_max_iter", self.probe_max_iter, 1)
        check_range("knn_k", self.knn_k, 1)
        check_range("finetune_epochs", self.finetune_epochs, 0)
        check_range("finetune_lr", self.finetune_lr, 0.0, open_lo=True)
        check_range("finetune_weight_decay", self.finetune_weight_decay, 0.0)
        check_range("finetune_batch_size", self.finetune_batch_size, 2)
        if (self.teacher is None) != (self.teacher_weights is None):
            raise ConfigError(
                "keys 'teacher' and 'teacher_weights' go together (--teacher ARCH --teacher-weights W)"
            )
        if self.projection is not None and self.teacher is None:
            raise ConfigError("key 'projection' needs a teacher (--teacher ARCH --teacher-weights W)")


def check_backbones(items: tuple[str, ...]) -> None:
    """At least one parseable ``name=arch:weights``, names unique."""
    if not items:
        raise ConfigError("key 'backbones': give at least one, e.g. --backbone random=resnet18:random")
    try:
        names = [parse_backbone(b).name for b in items]
    except EvalError as err:
        raise ConfigError(f"key 'backbones': {err}") from None
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(
            f"key 'backbones': name {dupes[0]!r} is used twice; give each backbone its own name"
        )


@dataclass(frozen=True)
class InspectConfig:
    store: str = ""  # feature cache (Zarr store) to describe
    json: bool = False  # print JSON instead of a table

    def __post_init__(self) -> None:
        if not self.store:
            raise ConfigError("key 'store' is required (kdep inspect STORE)")


@dataclass(frozen=True)
class VerifyConfig:
    store: str = ""  # feature cache (Zarr store) to check
    samples: int = 16  # random (key, view) pairs to recompute
    seed: int = 0  # seed of the sample
    tolerance: float | None = None  # max relative error (default: from the cache's precision)
    shards: str = ""  # the source shards, if they moved since caching (default: recorded)

    def __post_init__(self) -> None:
        if not self.store:
            raise ConfigError("key 'store' is required (kdep verify STORE)")
        check_range("samples", self.samples, 1)


@dataclass(frozen=True)
class DemoConfig:
    manifest: str = "manifests/demo.yaml"  # manifest whose sections every step reads
    sets: tuple[str, ...] = ()  # section.key=value overrides for the steps (repeatable)
    threads: int = 2  # CPU threads of torch and BLAS in every step, fixed so a re-run gives the same numbers (0 = the libraries' defaults)
    quiet: bool = False  # no progress bars


@dataclass(frozen=True)
class BenchConfig:
    CHOICES: ClassVar[dict] = {"scale_only": SCALE_BENCHES}
    quick: bool = False  # small sizes (about 2 minutes on 2 CPU cores)
    device: str = "cpu"  # cpu or cuda (GPU profile: R50 -> R18 at 224, AMP, 20k 375-500 px JPEGs)
    out: str = "benchmarks/results"  # folder for the JSON and PNG; generated images go to OUT/bench-data/
    scale: bool = False  # run the ImageNet-scale benches instead, each in a fresh process, one merged JSON
    scale_only: tuple[str, ...] = ()  # with --scale: only these (repeat the flag); empty = all in the tree
    scale_shards: int = 128  # simulated shards of 1000 rows, K=10, D=2048 (128 = 10% ImageNet, ~5 GB)
    scale_dir: str = ""  # folder for the scale benches' data (DIR/<bench>; default: temp folders, deleted)

    def __post_init__(self) -> None:
        check_choice("device", self.device, ("cpu", "cuda"))
        check_range("scale_shards", self.scale_shards, 1)
        check_choices(self)
        if self.scale_only and not self.scale:
            raise ConfigError("key 'scale_only' picks scale benches: give --scale with it")


def _check_study(c) -> None:
    """The settings every demo study shares (StudyViewsConfig, StudyLayersConfig): data, teacher, students,
    evaluation and runtime ranges."""
    check_range("classes", c.classes, 2, DEMO_CLASSES)
    check_range("train_per_class", c.train_per_class, 2)
    check_range("val_per_class", c.val_per_class, 1)
    check_range("min_side", c.min_side, 16)
    check_range("max_side", c.max_side, c.min_side)
    check_range("per_shard", c.per_shard, 1)
    check_range("resolution", c.resolution, 16, 1024)
    check_range("teacher_epochs", c.teacher_epochs, 1)
    check_range("dim", c.dim, 1)
    check_range("batch_size", c.batch_size, 2)
    check_range("lr", c.lr, 0.0, open_lo=True)
    check_range("knn_k", c.knn_k, 1)
    check_range("agreement_images", c.agreement_images, 0)
    check_range("threads", c.threads, 0, 256)
    check_range("workers", c.workers, 0, 64)
    _check_device(c.device)


STUDY_LOSSES = ("kdep", "cosine")  # losses whose target is the projected teacher feature (the cosine)


@dataclass(frozen=True)
class StudyViewsConfig:
    CHOICES: ClassVar[dict] = {"recipe": VIEW_RECIPES, "loss": STUDY_LOSSES}
    out: str = (
        "out/study-views"  # output folder: data, teacher, cache, students, eval, study.{md,csv,json,png}
    )
    ks: tuple[int, ...] = (
        1,
        2,
        4,
        8,
        16,
    )  # cached arms: train on the first k of the cache's views (k <= views)
    views: int = 16  # views cached per train image: one cache (and one projection) for every cached arm
    seeds: int = 5  # students per arm (seed s: the same init and data order in every arm)
    epochs: int = 32  # student epochs in every arm (a cached view is used epochs / k times)
    classes: int = 10  # demo classes, 2..10
    train_per_class: int = 50  # train images per class: cached, distilled on, and the probe / k-NN train set
    val_per_class: int = 300  # held-out images per class: the evaluation set (never cached)
    min_side: int = 48  # smallest generated image side in pixels
    max_side: int = 128  # largest generated image side in pixels
    per_shard: int = 50  # images per shard (stage 3 schedules one view per shard and epoch)
    data_seed: int = 0  # seed of the generated images and of the cached (and fresh) views' parameters
    resolution: int = 32  # view side in pixels for the teacher, the cache, the students and the evaluation
    teacher: str = "resnet18"  # architecture of the labelled demo teacher (trained here, then cached)
    teacher_epochs: int = 20  # supervised epochs of the demo teacher
    recipe: str = "paper"  # view recipe of the cache, of online KD's fresh views and of the agreement views
    student: str = "timm:test_resnet"  # student (torchvision name or timm:NAME, with a pre_relu tap)
    loss: str = "kdep"  # distillation loss
    dim: int = 96  # projection width D_s: the student's pre_relu width (timm test_resnet 96, ResNet-18 512)
    batch_size: int = 32  # student images per step
    lr: float = 0.1  # student peak SGD learning rate (step schedule: / 10 at 1/3 and at 2/3 of the epochs)
    knn_k: int = 20  # neighbours for cosine k-NN
    agreement_images: int = 2000  # held-out images for the cosine to the target (first whole shards); 0 = all
    threads: int = 0  # CPU threads of torch and BLAS (0 = their defaults; 1 on a machine shared with others)
    workers: int = 1  # DataLoader workers for caching, training and evaluation (0 = in the main process)
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    quiet: bool = False  # no progress bars

    def __post_init__(self) -> None:
        check_choices(self)
        if not self.out:
            raise ConfigError("key 'out' is required (--out DIR)")
        check_range("epochs", self.epochs, 1, 1000)
        check_range("views", self.views, 1, 1000)
        if not self.ks or len(set(self.ks)) != len(self.ks):
            raise ConfigError(f"key 'ks': {list(self.ks)} must list one or more k, each once (--ks 1,2,4)")
        for k in self.ks:
            if not 1 <= k <= self.views:
                raise ConfigError(f"key 'ks': {k} is not in 1..views ({self.views}); the cache holds {self.views} "
                                  "views per image (--views)")  # fmt: skip
        check_range("seeds", self.seeds, 1)
        _check_study(self)


@dataclass(frozen=True)
class StudyLayersConfig:
    CHOICES: ClassVar[dict] = {"recipe": VIEW_RECIPES, "agreement_views": VIEW_RECIPES, "loss": STUDY_LOSSES}
    out: str = "out/study-layers"  # output folder: data, teacher, cache, projections, students, eval, study.*
    seeds: int = 3  # students per arm (seeds 0..seeds-1: student init, shard order, view schedule, shuffle)
    single: str = "pre_relu=pre_relu"  # the single-tap arm's target, STUDENT_TAP=CACHE_TAP (KDEP)
    targets: tuple[str, ...] = (
        "stage2=stage2",
        "stage3=stage3",
        "pre_relu=pre_relu",
    )  # the multi-layer arm's targets, STUDENT_TAP=CACHE_TAP each
    target_weights: tuple[float, ...] = ()  # the multi-layer arm's weight per target; empty = all 1.0
    epochs: int = 16  # student epochs
    views: int = 8  # K views cached per train image
    classes: int = 10  # demo classes, 2..10
    train_per_class: int = 60  # train images per class: cached, distilled on, and the probe / k-NN train set
    val_per_class: int = 100  # held-out images per class: the evaluation set (never cached)
    min_side: int = 64  # smallest generated image side in pixels
    max_side: int = 256  # largest generated image side in pixels
    per_shard: int = 100  # images per shard
    data_seed: int = 0  # seed of the generated images and of the cached views' parameters
    resolution: int = 64  # view side in pixels for the teacher, the cache, the students and the evaluation
    teacher: str = "resnet18"  # architecture of the labelled demo teacher (trained here, then cached)
    teacher_epochs: int = 30  # supervised epochs of the demo teacher
    recipe: str = "paper"  # view recipe of the cache
    student: str = "resnet18"  # student architecture (torchvision name)
    loss: str = "kdep"  # distillation loss of both arms
    loss_weight: float = 3.0  # w in w * MSE, for every target
    dim: int = (
        512  # the pre_relu projection width (cosine to target); stage taps get the student's stage width
    )
    batch_size: int = 64  # student images per step
    lr: float = 0.1  # student peak SGD learning rate (step schedule: / 10 at 1/3 and at 2/3 of the epochs)
    knn_k: int = 20  # neighbours for cosine k-NN
    agreement_views: str = "paper"  # recipe of the held-out val views for the cosine to the pre_relu target
    agreement_images: int = 1000  # val images for the cosine (first whole shards, at least so many); 0 = all
    distpro: bool = True  # add the DistPro arm: search a process on the cache's stage taps, retrain with it
    search_epochs: int = 4  # DistPro arm: epochs of the process search (kdep search-process, seed 0)
    alpha_threshold: float = 0.5  # DistPro arm: drop pathways whose normalised alpha stays below it (Table 3)
    threads: int = 0  # CPU threads of torch and BLAS (0 = their defaults; 1 on a machine shared with others)
    workers: int = 1  # DataLoader workers for caching, training and evaluation (0 = in the main process)
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    quiet: bool = False  # no progress bars

    def __post_init__(self) -> None:
        check_choices(self)
        if not self.out:
            raise ConfigError("key 'out' is required (--out DIR)")
        check_range("seeds", self.seeds, 1)
        check_range("search_epochs", self.search_epochs, 1)
        check_range("alpha_threshold", self.alpha_threshold, 0.0, 1.0)
        for key, items in (("single", (self.single,)), ("targets", self.targets)):
            for item in items:
                parse_target(item, key)
        if len(self.targets) < 2 or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"key 'targets': {list(self.targets)} must name two or more targets, each once")
        if self.target_weights and len(self.target_weights) != len(self.targets):
            raise ConfigError(
                f"key 'target_weights': {len(self.target_weights)} for {len(self.targets)} targets; one each"
            )
        check_range("epochs", self.epochs, 1, 1000)
        check_range("views", self.views, 1, 1000)
        _check_study(self)

    @property
    def cache_taps(self) -> tuple[str, ...]:
        """The taps the study caches: pre_relu (the cosine to target), every arm's teacher taps and, for the
        DistPro arm, every stage tap, each once."""
        named = [parse_target(t)[1] for t in (self.single, *self.targets)]
        stages = ["stage1", "stage2", "stage3", "stage4"] if self.distpro else []  # DistPro's pathways
        return tuple(dict.fromkeys(["pre_relu", *named, *stages]))


@dataclass(frozen=True)
class SearchProcessConfig:
    CHOICES: ClassVar[dict] = {"mode": SEARCH_MODES, "pathways": PATHWAY_SETS, "transform": SEARCH_TRANSFORMS,
                               "objective": SEARCH_OBJECTIVES, "lr_schedule": SEARCH_LR_SCHEDULES,
                               "pathway_loss": PATHWAY_LOSSES, "stage_features": STAGE_FEATURES,
                               "hypergradient": HYPERGRADIENTS}  # fmt: skip
    cache: str = (
        ""  # feature cache folder; cached mode needs taps stage1..stageN (cache-teacher --taps stage1,...)
    )
    out: str = ""  # output folder: process.json, alpha.png, config.search_process.json
    student: str = "resnet18"  # student model (torchvision name or timm:NAME), random init
    shards: str = ""  # source shards, if they moved since caching (default: the cache's recorded source)
    mode: str = "cached"  # cached: pooled stage taps from the cache, the teacher never runs; online: spatial
    # stage maps with the teacher run live on the same views (maps are too large to cache: ~3 MB per view for all
    # ResNet-50 stages at 224 px in float16)
    pathways: str = (
        "paper"  # paper: teacher stage i -> student stage j <= i (appendix); reference: j >= i (code)
    )
    transform: str = "auto"  # transform block per pathway: mlp or linear on pooled rows (cached mode);
    # conv-reference (the official code's connector: three 3x3 convs, self-attention) or conv (a lighter 1x1 + 3x3)
    # on maps (online mode); auto: mlp (cached) or conv-reference (online)
    pathway_loss: str = "hcl"  # hcl: the official code's hierarchical context loss (the MSE plus the MSEs of
    # the maps average-pooled to 4x4, 2x2, 1x1, weighted 1/2, 1/4, 1/8); on pooled rows exactly the MSE; or mse
    stage_features: str = "output"  # output: pathways between stage outputs (stageK taps); pre_relu: each
    # stage before its final ReLU (stageK_pre taps), as the official code; torchvision ResNets and MobileNetV2
    # only (cached mode: cache-teacher --taps stage1_pre,stage2_pre,stage3_pre,stage4_pre)
    hidden: int = 512  # hidden width of the mlp transform blocks
    objective: str = (
        "auto"  # held-out objective: ce (labels, as DistPro) or regress (label-free, last stage tap)
    )
    classes: int = 0  # classes for ce when the shards have no index.json (0 = from the index)
    val_fraction: float = 0.2  # share of the images held out for alpha, by seeded key hash, (0, 1)
    epochs: int = 1  # passes over the train split
    max_steps: int = 0  # stop after this many search steps (0 = all epochs)
    batch_size: int = 64  # images per train batch and per held-out batch
    lr: float = 0.1  # network SGD learning rate (also the xi of the unrolled step)
    lr_schedule: str = "constant"  # network lr over the search steps: constant (the official search's),
    # cosine (per step, to 0) or step (/10 at 1/3 and 2/3)
    momentum: float = 0.9  # network SGD momentum (in the virtual step too)
    nesterov: bool = True  # Nesterov momentum for the network SGD, as the official code (and in the
    # virtual step: the alpha gradient unrolls the step the optimiser takes)
    weight_decay: float = 5e-4  # network SGD weight decay (in the virtual step too)
    alpha_lr: float = (
        0.1  # Adam lr of alpha (public code default 0.1 for CNNs; appendix 1e-3 for transformers)
    )
    alpha_weight_decay: float = 0.0  # Adam weight decay of alpha (public code: 0)
    hypergradient: str = "exact"  # alpha's gradient: exact (double backward through the virtual step) or
    # finite-difference (DARTS' and the official code's approximation, with fd_radius)
    fd_radius: float = (
        0.01  # finite-difference only: r of the Hessian-vector product, eps = r / ||v|| (DARTS: 0.01)
    )
    kd_weight: float = 1.0  # weight of the alpha-weighted sum of pathway losses in the training loss
    seed: int = 0  # student and block init, held-out split, shard order and view schedule
    workers: int = 2  # DataLoader workers per split (0 = in the main process)
    device: str = "auto"  # auto, cpu, cuda or cuda:N (the search runs in float32)
    skip_bad: bool = False  # skip samples that do not join the cache instead of stopping
    quiet: bool = False  # no banner or progress bar

    def __post_init__(self) -> None:
        if not self.cache or not self.out:
            raise ConfigError("keys 'cache' and 'out' are required (--cache CACHE --out DIR)")
        check_choices(self)
        check_choice("device", self.device.split(":")[0], DEVICES)
        spatial_kinds = ("conv-reference", "conv")
        if (self.mode == "cached" and self.transform in spatial_kinds) or (
            self.mode == "online" and self.transform in ("mlp", "linear")
        ):
            raise ConfigError(
                f"key 'transform': {self.transform!r} does not fit mode {self.mode!r}; cached pathways carry pooled "
                "rows (mlp, linear), online pathways spatial maps (conv-reference, conv)"
            )
        if self.nesterov and self.momentum == 0:
            raise ConfigError(
                "key 'nesterov': Nesterov momentum needs momentum > 0; set --momentum or --no-nesterov"
            )
        check_range("hidden", self.hidden, 1)
        check_range("classes", self.classes, 0)
        check_range("val_fraction", self.val_fraction, 0.0, 0.9, open_lo=True)
        check_range("epochs", self.epochs, 1)
        check_range("max_steps", self.max_steps, 0)
        check_range("batch_size", self.batch_size, 2)
        check_range("lr", self.lr, 0.0, open_lo=True)
        check_range("momentum", self.momentum, 0.0, 1.0)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("alpha_lr", self.alpha_lr, 0.0, open_lo=True)
        check_range("alpha_weight_decay", self.alpha_weight_decay, 0.0)
        check_range("fd_radius", self.fd_radius, 0.0, open_lo=True)
        check_range("kd_weight", self.kd_weight, 0.0, open_lo=True)
        check_range("workers", self.workers, 0, 64)

    @property
    def transform_kind(self) -> str:
        """The transform block actually built: ``auto`` -> mlp (cached) or conv-reference (online)."""
        if self.transform != "auto":
            return self.transform
        return "mlp" if self.mode == "cached" else "conv-reference"
