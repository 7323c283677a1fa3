"""The measurements behind `kdep bench`, one function per figure; each returns a dict of named results (and the
``checks`` of its agreement figures, benchmarks/checks.py)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms as T

from benchmarks.bench_data import BenchData
from benchmarks.checks import check
from pipeline.cache.join import source_shard_paths
from pipeline.cache.store import FeatureStore, open_store
from pipeline.cache.teacher import Runtime, prepare_teacher, teacher_features
from pipeline.cache.verify import DEFAULT_TOLERANCE
from pipeline.data.images import decode_rgb, image_bytes
from pipeline.data.shards import iter_samples, list_shards
from pipeline.data.views import IMAGENET_MEAN, IMAGENET_STD, replay_view, sample_views
from pipeline.errors import KdepError
from pipeline.projection.artefact import Projection, load_projection
from pipeline.runtime import resolve_amp
from pipeline.student.loaders import LoaderSpec, PairLoaders
from pipeline.student.online import build_online_teacher
from pipeline.student.pairs import StreamSpec, consumer_plan, shard_order
from pipeline.student.specs import LossSpec
from pipeline.student.trainees import make_optimizer
from pipeline.student.training import (
    StepContext,
    Student,
    make_scaler,
    teacher_targets,
    train_step,
    views_on_device,
)
from stages.cache_teacher import CacheTeacherConfig
from stages.cache_teacher import run as cache_run
from stages.fit_svd import FitSvdConfig
from stages.fit_svd import run as fit_run
from stages.inspect_cache import summarize

WARMUP_STEPS = 2  # untimed steps before each timed student run (first-step allocation, cuDNN autotuning)


def bench_workers(prof) -> int:
    """DataLoader workers of the caching and stage 3 loaders: the profile's, else 8 on CUDA and 2 on CPU."""
    if prof.workers >= 0:
        return prof.workers
    return 8 if prof.device.startswith("cuda") else 2


def bench_data_spec(prof) -> BenchData:
    """Train shards for ``prof``: two per worker (whole shards per worker, as on a real data set)."""
    shards = max(1, min(prof.images, 2 * max(1, bench_workers(prof))))
    return BenchData(prof.images, shards, prof.min_side, prof.max_side)


def student_batches_per_epoch(shard_sizes: list[int], workers: int, batch: int) -> int:
    """Batches of >= 2 images stage 3's stream gives in epoch 0 (seed 0): each worker batches only its own share
    (pipeline.student.pairs.consumer_plan: whole shards, or every g-th sample of a shard shared by g workers)."""
    consumers, total = max(1, workers), 0
    order = shard_order(0, 0, len(shard_sizes))
    for c in range(consumers):
        shards, member, group = consumer_plan(order, c, consumers)
        n = sum(len(range(member, shard_sizes[s], group)) for s in shards)
        total += n // batch + (n % batch >= 2)
    return total


def check_student_epoch(prof, shard_sizes: list[int]) -> None:
    """The student benchmark times one epoch's batches (never a second loader): refuse a profile whose epoch is
    too short for the warm-up plus the timed steps, before anything is generated or cached."""
    have = student_batches_per_epoch(shard_sizes, bench_workers(prof), prof.batch)
    if have < WARMUP_STEPS + prof.steps:
        raise KdepError(_short_epoch(have, prof))


def _short_epoch(have: int, prof) -> str:
    workers = bench_workers(prof)
    return (f"bench: stage 3's epoch gives {have} batches of >= 2 images ({prof.images} images, {workers} workers, "
            f"batch {prof.batch}: each worker batches only its own ~{prof.images // max(1, workers)} samples) but "
            f"the student benchmark needs {WARMUP_STEPS + prof.steps} ({WARMUP_STEPS} warm-up + {prof.steps} timed) "
            "from one epoch; use more images, fewer workers, a smaller batch or fewer steps")  # fmt: skip


def _encoded(data: Path, limit: int) -> list[tuple[str, bytes]]:
    """The first ``limit`` (key, encoded image) pairs of the shards (reading no further)."""
    out = []
    for info in list_shards(data):
        for s in iter_samples(info.path):
            if len(out) == limit:
                return out
            out.append((s.key, image_bytes(s, info.path)))
    return out


def bench_cache_vs_inference(data: Path, tmp: Path, prof) -> dict:
    """Caching (decode + K replays + teacher + write) vs bare teacher inference on batches of the same views."""
    device = torch.device(prof.device)
    rt = Runtime(device, resolve_amp("auto", device), True, bench_workers(prof), False, False)
    model = torchvision.models.get_model(prof.teacher)
    taps = prepare_teacher(model, ("pre_relu",), rt)
    views = []
    for key, data_bytes in _encoded(data, max(1, prof.batch // prof.views) * 2):
        image = decode_rgb(data_bytes)
        for p in sample_views("paper", 0, key, prof.views, *image.shape[1:], False):
            views.append(replay_view(image, p, prof.resolution))
    batch = (
        torch.stack(views[: prof.batch]).pin_memory()
        if device.type == "cuda"
        else torch.stack(views[: prof.batch])
    )
    teacher_features(taps, batch, rt)  # warm-up
    n_batches = max(3, prof.images * prof.views // prof.batch)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        teacher_features(taps, batch, rt)
    _sync(device)
    bare = n_batches * len(batch) / (time.perf_counter() - t0)
    torch.save(model.state_dict(), tmp / "teacher.pt")
    cfg = CacheTeacherConfig(shards=str(data), out=str(tmp / "cache"), teacher=prof.teacher, weights=str(tmp / "teacher.pt"),
                             views=prof.views, resolution=prof.resolution, batch_size=prof.batch,
                             workers=bench_workers(prof), device=prof.device, quiet=True)  # fmt: skip
    stats = cache_run(cfg)
    cached = stats["images_per_s"] * prof.views
    info = summarize(open_store(cfg.out))
    d_t = info["taps"]["pre_relu"]
    return {"cache_views_per_s": cached, "inference_views_per_s": bare, "cache_vs_inference": cached / bare,
            "cache_images_per_s": stats["images_per_s"], "feature_bytes_per_view": info["feature_bytes_per_view"],
            "bytes_per_view_over_2Dt": info["feature_bytes_per_view"] / (2 * d_t)}  # fmt: skip


SECOND_TEACHER = {
    "cpu": "timm:vit_tiny_patch16_224",
    "cuda": "timm:vit_base_patch16_224",
}  # besides prof.teacher
TEACHER_ROUNDS = 2  # each variant runs this many times, interleaved; the fastest run of each counts


def bench_teachers(data: Path, tmp: Path, prof) -> dict:
    """Two teachers (the profile's CNN and a ViT) cached in one pass (each image decoded once, each view replayed
    once) vs each in its own pass over the same shards; views/s of the whole pass and per teacher (its forwards'
    share of the pass). The variants alternate (one pass, CNN alone, ViT alone, again), so slow drift on a shared
    machine hits them alike; each keeps its fastest round."""
    import timm

    second = SECOND_TEACHER["cuda" if prof.device.startswith("cuda") else "cpu"]
    torch.save(torchvision.models.get_model(prof.teacher).state_dict(), tmp / "t-cnn.pt")
    torch.save(
        timm.create_model(second.split(":", 1)[1], img_size=prof.resolution).state_dict(), tmp / "t-vit.pt"
    )
    common = dict(shards=str(data), views=prof.views, resolution=prof.resolution, batch_size=prof.batch,
                  workers=bench_workers(prof), device=prof.device, quiet=True)  # fmt: skip
    variants = {
        "both": dict(teacher=(f"cnn={prof.teacher}", f"vit={second}"), taps=("cnn/pre_relu", "vit/pooled"),
                     weights=(str(tmp / "t-cnn.pt"), str(tmp / "t-vit.pt"))),
        "cnn": dict(teacher=(prof.teacher,), weights=(str(tmp / "t-cnn.pt"),), taps=("pre_relu",)),
        "vit": dict(teacher=(second,), weights=(str(tmp / "t-vit.pt"),), taps=("pooled",)),
    }  # fmt: skip
    best: dict[str, dict] = {}
    for r in range(TEACHER_ROUNDS):
        for name, kw in variants.items():
            stats = cache_run(CacheTeacherConfig(out=str(tmp / f"teachers-{name}-{r}"), **kw, **common))
            if name not in best or stats["seconds"] < best[name]["seconds"]:
                best[name] = stats
    views = best["both"]["images"] * prof.views
    separate = best["cnn"]["seconds"] + best["vit"]["seconds"]
    return {
        "teachers": [prof.teacher, second],
        "teachers_one_pass_views_per_s": views / best["both"]["seconds"],
        "teachers_separate_views_per_s": views / separate,
        "teachers_one_pass_vs_separate": separate / best["both"]["seconds"],
        "teacher_views_per_s_in_pass": {k: views / v for k, v in best["both"]["teacher_seconds"].items()},
        "teacher_views_per_s_alone": {k: views / best[k]["seconds"] for k in ("cnn", "vit")},
    }


def bench_decode_once(data: Path, prof) -> dict:
    """Per image: one decode + K replays, vs K x (decode + replay)."""
    images = _encoded(data, 60)
    t0 = time.perf_counter()
    for key, b in images:
        image = decode_rgb(b)
        for p in sample_views("paper", 0, key, prof.views, *image.shape[1:], False):
            replay_view(image, p, prof.resolution)
    once = (time.perf_counter() - t0) / len(images)
    t0 = time.perf_counter()
    for key, b in images:
        hw = decode_rgb(b).shape[1:]
        for p in sample_views("paper", 0, key, prof.views, *hw, False):
            replay_view(decode_rgb(b), p, prof.resolution)
    k_times = (time.perf_counter() - t0) / len(images) - once / prof.views  # minus the size probe decode
    return {"decode_once_ms_per_image": once * 1e3, "decode_k_times_ms_per_image": k_times * 1e3,
            "decode_once_speedup": k_times / once}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage3_loaders(
    store: FeatureStore, resolution: int, batch: int, workers: int, pin: bool, shards: int | None = None
) -> PairLoaders:
    """Stage 3's loaders (the key-joined stream, seed 0, a 64-sample shuffle buffer) over the cache's shards (the
    first ``shards`` of them when given)."""
    paths = tuple(source_shard_paths(store))[:shards]
    stream = StreamSpec(store=str(store.path), shard_paths=paths, tap="pre_relu", resolution=resolution, seed=0,
                        shuffle_buffer=64, uint8_views=True)  # fmt: skip
    return PairLoaders(LoaderSpec(stream, batch, workers, pin), store)


def bench_student_steps(cache: Path, tmp: Path, prof) -> dict:
    """Student images/s with (a) no distillation, (b) targets from the cache, (c) the online teacher: stage 3's
    loaders, step context and ``train_step`` in each; only where the targets come from differs. Also the loader
    alone over the same batches (when it is the slowest part, every variant runs at its rate)."""
    device = torch.device(prof.device)
    fit_run(FitSvdConfig(cache=str(cache), out=str(tmp / "proj.npz"), dim=512, quiet=True))
    proj = load_projection(tmp / "proj.npz")
    store = open_store(cache)
    loaders = stage3_loaders(store, prof.resolution, prof.batch, bench_workers(prof), device.type == "cuda")
    ctx = StepContext(device, resolve_amp("auto", device), LossSpec("kdep", 3.0), channels_last=True)
    online = replace(ctx, teacher=build_online_teacher(store, ("pre_relu",), device, channels_last=True))
    agreement = online_agreement(loaders, ctx, online, store.provenance["compute"]["amp"])
    variants = {"plain": ctx, "cached": ctx, "online": online, "cached_again": ctx}
    rates = {v: _student_rate(loaders, c, None if v == "plain" else proj, prof) for v, c in variants.items()}
    cached = max(
        rates["cached"], rates["cached_again"]
    )  # the best of two runs, as for the others' single run
    return {"student_images_per_s": rates, "student_cached_vs_plain": cached / rates["plain"],
            "cached_vs_online": cached / rates["online"],
            "student_loader_images_per_s": _timed(_usable_batches(loaders), lambda x, rows: None, device, prof),
            **agreement}  # fmt: skip


def online_agreement(loaders: PairLoaders, ctx: StepContext, online: StepContext, amp: str) -> dict:
    """On epoch 0's first batch: the cached teacher rows against the online teacher on the same replayed views, as
    `kdep verify` measures them (max over rows of max |cached - online| / max |online|), within verify's tolerance
    for the cache's precision."""
    x, rows = next(_usable_batches(loaders))
    with torch.no_grad():
        cached = teacher_targets(rows, views_on_device(x, ctx), ctx).float()
        live = teacher_targets(rows, views_on_device(x, online), online).float()
    error = float(((cached - live).abs().amax(dim=1) / live.abs().amax(dim=1)).max())
    about = f"cached teacher rows vs the online teacher on the replayed views, {len(x)} images (amp {amp})"
    return {"cached_vs_online_target_max_rel_error": error,
            "checks": [check("cached_vs_online_target_max_rel_error", error, DEFAULT_TOLERANCE[amp], about)]}  # fmt: skip


def _usable_batches(loaders: PairLoaders) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Epoch 0's (views, rows) batches, one loader, leaving out a worker's last batch of one as stage 3 does."""
    return ((x, rows) for x, rows, _ids in loaders.for_epoch(0) if len(x) >= 2)


def _timed(batches: Iterator, step, device: torch.device, prof) -> float:
    """Images/s of ``step(x, rows)`` over ``prof.steps`` batches after ``WARMUP_STEPS``, all from the one epoch
    iterator ``batches`` (no loader is built in the timed region); an epoch too short is an error, not a wrap."""
    done = 0
    for x, rows in itertools.islice(batches, WARMUP_STEPS):
        step(x, rows)
        done += 1
    _sync(device)
    images, t0 = 0, time.perf_counter()
    for x, rows in itertools.islice(batches, prof.steps):
        step(x, rows)
        images, done = images + len(x), done + 1
    _sync(device)
    seconds = time.perf_counter() - t0
    if done < WARMUP_STEPS + prof.steps:
        raise KdepError(_short_epoch(done, prof))
    return images / seconds


def _student_rate(loaders: PairLoaders, ctx: StepContext, proj: Projection | None, prof) -> float:
    """Images/s of stage 3's ``train_step`` on one epoch's batches; ``proj`` None: no distillation (the same
    step against a constant zero target, so no teacher rows are moved or projected)."""
    torch.manual_seed(0)
    student = Student(prof.student, "pre_relu", "kdep", 512, prof.resolution).to(ctx.device)
    if ctx.device.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
    opt, scaler = make_optimizer(student, 0.01, 1e-4), make_scaler(ctx.device, ctx.amp)

    def step(x: torch.Tensor, rows: torch.Tensor) -> None:
        x = views_on_device(x, ctx)
        if proj is None:
            target = torch.zeros(len(x), student.d_feature, device=ctx.device)
        else:
            target = proj.targets(teacher_targets(rows, x, ctx))
        train_step(student, opt, x, target, ctx, scaler)

    return _timed(_usable_batches(loaders), step, ctx.device, prof)


def bench_loader_vs_torchvision(data: Path, tmp: Path, prof) -> dict:
    """Per core (no workers): our replay loader (join + decode + crop + resize + normalise) vs torchvision's
    ImageFolder + RandomResizedCrop + flip + ToTensor + Normalize on the same images (the first shards, at least
    ``prof.loader_images`` images)."""
    shards = list_shards(data)
    counts = itertools.accumulate(s.samples or 0 for s in shards)
    used = next((i + 1 for i, n in enumerate(counts) if n >= prof.loader_images), len(shards))
    folder = tmp / "imagefolder"
    for info in shards[:used]:
        for s in iter_samples(info.path):
            ext = next(e for e in s.fields if e != "cls")
            d = folder / s.fields["cls"].decode()
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{s.key}.{ext}").write_bytes(s.fields[ext])
    tv = torchvision.datasets.ImageFolder(str(folder), transform=T.Compose([
        T.RandomResizedCrop(prof.resolution), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]))  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        n_tv = sum(len(x) for x, _ in DataLoader(tv, batch_size=32, shuffle=True, num_workers=0))
        tv_rate = n_tv / (time.perf_counter() - t0)
        loaders = stage3_loaders(open_store(tmp / "cache"), prof.resolution, 32, 0, False, used)
        t0 = time.perf_counter()
        n_ours = sum(len(x) for x, _r, _i in loaders.for_epoch(0))
        ours = n_ours / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return {
        "loader_images_per_s_per_core": {"kdep": ours, "torchvision": tv_rate},
        "loader_vs_torchvision": ours / tv_rate,
    }
