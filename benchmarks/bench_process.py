"""Cost of DistPro's search step next to a plain distillation step, side by side in one process.

    python -m benchmarks.bench_process                     # ResNet-18 student, 10 pooled pathways, 64 px, batch 32
    python -m benchmarks.bench_process --mode online --resolution 112 --device cuda
    python -m benchmarks.bench_process --quick             # 32 px, batch 8, few steps (seconds on CPU)

Both steps run on the same model and the same synthetic batch (teacher targets are fixed random tensors with the
widths of a ResNet-50's stages: the teacher's own cost is left out, as in cached mode). *Plain* is one weight step
on the alpha-weighted pathway loss (what a retrain with a fixed process costs); *search* is the architect's
second-order alpha step (``--hypergradient``: exact, a double backward through the virtual step, or DARTS' finite
difference: virtual step, held-out gradient, two more gradients) plus the same weight step. DARTS' count says the
ratio is about 5 (five forward/backward passes against one). Steps alternate (plain, search, plain, ...) after
warm-up, so drift on a shared machine hits both alike. The network optimiser is Nesterov SGD, as the stage's
default. ``hypergradient_check`` compares the two alpha gradients on one batch pair: the finite difference's
relative error against the exact one at DARTS' r = 0.01, and the median seconds of each.

Retrain speed by alpha threshold (cached mode, DistPro's Table 3 trade-off): stage 3's own student and
``train_step`` (``--loss distpro``) with the pathways a threshold keeps, against all 10. The pathways kept come
from ``--process FILE`` (its ``kept_pathways``), or, without one, from a synthetic process whose pathways' largest
normalised alphas are 1.0, 0.9, ..., 0.1 (thresholds 0.3 / 0.5 / 0.7 keep 8 / 6 / 4 of 10, near Table 3's 80% /
50% / 26% of the alphas). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torchvision

from pipeline.process.artefact import make_pathways
from pipeline.process.online import StageMaps, stage_shapes
from pipeline.process.search import (
    Architect,
    Batch,
    ProcessSearch,
    hypergradient,
    momentum_buffers,
    network_step,
)

TEACHER = {"stage1": 256, "stage2": 512, "stage3": 1024, "stage4": 2048}  # ResNet-50 stage widths


def make_batch(mode: str, batch: int, resolution: int, shapes: dict, device: torch.device) -> Batch:
    """Views, ResNet-50-wide targets (pooled rows, or maps at the student's stage sizes), labels of 10 classes."""
    g = torch.Generator().manual_seed(0)
    targets = {
        t: torch.randn(batch, d, *(shapes[t][1:] if mode == "online" else ()), generator=g)
        for t, d in TEACHER.items()
    }
    x = torch.randn(batch, 3, resolution, resolution, generator=g)
    return Batch(x, targets, torch.randint(0, 10, (batch,), generator=g)).to(device)


def time_steps(fn, steps: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


THRESHOLDS = (0.0, 0.3, 0.5, 0.7)


def kept_by_threshold(process_file: str, names: list[str]) -> dict[float, list[str]]:
    """{threshold: pathway names kept}: from a process file, or the synthetic reach 1.0, 0.9, ... (module doc)."""
    if process_file:
        from pipeline.process.artefact import kept_pathways, load_process

        process = load_process(process_file)
        return {t: kept_pathways(process, t) for t in THRESHOLDS}
    reach = {n: 1.0 - 0.1 * i for i, n in enumerate(names)}
    return {t: [n for n in names if reach[n] >= t - 1e-9] for t in THRESHOLDS}


def bench_retrain(args, pathways, device: torch.device) -> dict:
    """Median seconds of one stage 3 distpro step per threshold (the steps of each variant interleaved)."""
    from pipeline.student.specs import LossSpec, TargetSpec
    from pipeline.student.trainees import make_optimizer
    from pipeline.student.training import StepContext, Student, train_step

    by_name = {p.name: p for p in pathways}
    kept = kept_by_threshold(args.process, [p.name for p in pathways])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=g).to(device)
    rows = {t: torch.randn(args.batch, d, generator=g).to(device) for t, d in TEACHER.items()}
    runs = {}
    for t, names in kept.items():
        targets = tuple(TargetSpec(by_name[n].student_tap, by_name[n].teacher_tap) for n in names)
        torch.manual_seed(0)
        student = Student("resnet18", tuple(a.student_tap for a in targets), "distpro",
                          tuple(TEACHER[a.cache_tap] for a in targets), args.resolution).to(device)  # fmt: skip
        ctx = StepContext(device, "off", LossSpec("distpro", 3.0), targets=targets)
        opt = make_optimizer(student, 0.01, 5e-4)
        step = lambda s=student, o=opt, c=ctx, tg=targets: train_step(  # noqa: E731
            s, o, x, [rows[a.cache_tap] for a in tg], c
        )
        time_steps(step, 1, device)  # warm-up
        runs[t] = (step, [])
    for _ in range(args.steps):
        for step, times in runs.values():
            times += time_steps(step, 1, device)
    base = statistics.median(runs[0.0][1])
    return {
        f"threshold_{t:g}": {"pathways": len(kept[t]), "step_s": round(statistics.median(v[1]), 4),
                             "speedup_vs_all": round(base / statistics.median(v[1]), 3)}
        for t, v in runs.items()
    }  # fmt: skip


def hypergradient_check(
    model: ProcessSearch, network, batch: Batch, steps: int, device: torch.device
) -> dict:
    """The finite difference (r = 0.01) against the exact alpha gradient on one batch pair, and their times."""
    group = network.param_groups[0]
    args = (
        model,
        batch,
        batch,
        group["lr"],
        group["momentum"],
        group["weight_decay"],
        momentum_buffers(model, network),
    )
    grads, times = {}, {}
    for method in ("exact", "finite-difference"):
        run = lambda m=method: grads.__setitem__(m, hypergradient(*args, method=m, nesterov=True)[0])  # noqa: E731
        times[method] = statistics.median(time_steps(run, max(2, steps // 2), device))
    exact, fd = grads["exact"], grads["finite-difference"]
    return {"fd_r0.01_relative_error": round(float((fd - exact).norm() / exact.norm()), 4),
            "exact_s": round(times["exact"], 4), "finite_difference_s": round(times["finite-difference"], 4)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("cached", "online"), default="cached")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--process", default="", help="process.json whose kept pathways the retrain uses")
    parser.add_argument("--hypergradient", choices=("exact", "finite-difference"), default="exact")
    parser.add_argument("--transform", default="", help="mlp/linear (cached), conv-reference/conv (online)")
    args = parser.parse_args()
    if args.quick:
        args.resolution, args.batch, args.steps = 32, 8, 3
    device = torch.device(args.device)
    torch.manual_seed(0)
    student = StageMaps(torchvision.models.resnet18())
    shapes = stage_shapes(student, args.resolution)
    pathways = make_pathways(TEACHER, {k: v[0] for k, v in shapes.items()})
    kind = args.transform or ("mlp" if args.mode == "cached" else "conv-reference")
    model = ProcessSearch(student, pathways, kind, "ce", (shapes["stage4"][0], 10)).to(device).train()
    batch = make_batch(args.mode, args.batch, args.resolution, shapes, device)
    network = torch.optim.SGD(
        model.weight_parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True
    )
    architect = Architect(model, network, alpha_lr=0.1, method=args.hypergradient)

    def plain() -> None:
        network_step(model, network, batch)

    def search() -> None:
        architect.step(batch, batch)
        network_step(model, network, batch)

    (
        time_steps(plain, 1, device),
        time_steps(search, 1, device),
    )  # warm-up (allocator, cuDNN, momentum buffers)
    plain_s, search_s = [], []
    for _ in range(args.steps):
        plain_s += time_steps(plain, 1, device)
        search_s += time_steps(search, 1, device)
    p, s = statistics.median(plain_s), statistics.median(search_s)
    print(json.dumps({
        "mode": args.mode, "transform": kind, "pathways": len(pathways), "resolution": args.resolution,
        "batch": args.batch, "device": str(device), "threads": torch.get_num_threads(), "steps": args.steps,
        "hypergradient": args.hypergradient,
        "plain_step_s": round(p, 4), "search_step_s": round(s, 4), "search_over_plain": round(s / p, 2),
        "hypergradient_check": hypergradient_check(model, network, batch, args.steps, device),
        "retrain_by_threshold": bench_retrain(args, pathways, device),
        "process": args.process or "synthetic (largest normalised alphas 1.0, 0.9, ..., 0.1)",
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
