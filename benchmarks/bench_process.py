"""Cost of DistPro's search step next to a plain distillation step, side by side in one process.

    python -m benchmarks.bench_process                     # ResNet-18 student, 10 pooled pathways, 64 px, batch 32
    python -m benchmarks.bench_process --mode online --resolution 112 --device cuda
    python -m benchmarks.bench_process --quick             # 32 px, batch 8, few steps (seconds on CPU)

Both steps run on the same model and the same synthetic batch (teacher targets are fixed random tensors with the
widths of a ResNet-50's stages: the teacher's own cost is left out, as in cached mode). *Plain* is one weight step
on the alpha-weighted pathway loss (what a retrain with a fixed process costs); *search* is the architect's
second-order alpha step (virtual step, held-out gradient, two finite-difference gradients) plus the same weight
step. DARTS' count says the ratio is about 5 (five forward/backward passes against one). Steps alternate
(plain, search, plain, ...) after warm-up, so drift on a shared machine hits both alike. Prints JSON.
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
from pipeline.process.search import Architect, Batch, ProcessSearch, network_step

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("cached", "online"), default="cached")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.resolution, args.batch, args.steps = 32, 8, 3
    device = torch.device(args.device)
    torch.manual_seed(0)
    student = StageMaps(torchvision.models.resnet18())
    shapes = stage_shapes(student, args.resolution)
    pathways = make_pathways(TEACHER, {k: v[0] for k, v in shapes.items()})
    kind = "mlp" if args.mode == "cached" else "conv"
    model = ProcessSearch(student, pathways, kind, "ce", (shapes["stage4"][0], 10)).to(device).train()
    batch = make_batch(args.mode, args.batch, args.resolution, shapes, device)
    network = torch.optim.SGD(model.weight_parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    architect = Architect(model, network, alpha_lr=0.1)

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
        "plain_step_s": round(p, 4), "search_step_s": round(s, 4), "search_over_plain": round(s / p, 2),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
