"""A small labelled teacher for the demo: it stands in for a pre-trained ImageNet teacher (real users pass
torchvision weights). Supervised training on the demo shards with the shared view replay."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.images import decode_rgb, image_bytes
from pipeline.data.shards import iter_samples, list_shards
from pipeline.data.views import replay_view, sample_view_params
from pipeline.files import atomic_path
from pipeline.progress import progress_bar
from pipeline.runtime import pick_device


@dataclass(frozen=True)
class TeacherRecipe:
    arch: str = "resnet18"  # torchvision model name
    epochs: int = 30  # supervised epochs
    batch_size: int = 32  # images per step
    lr: float = 0.05  # peak SGD learning rate, cosine to zero, momentum 0.9 (Nesterov)
    weight_decay: float = 5e-4
    resolution: int = 64  # training view side
    seed: int = 0
    device: str = "cpu"  # auto, cpu, cuda or cuda:N (the weights are saved from the CPU either way)


class LabelledViews(IterableDataset):
    """(view, label) pairs: a fresh `paper` view per (image, epoch), shards split over workers."""

    def __init__(self, shard_dir: str, resolution: int, seed: int, recipe: str = "light") -> None:
        self.paths = [s.path for s in list_shards(shard_dir)]
        self.resolution, self.seed, self.recipe, self.epoch = resolution, seed, recipe, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        paths = self.paths if info is None else self.paths[info.id :: info.num_workers]
        for path in paths:
            for s in iter_samples(path):
                image = decode_rgb(image_bytes(s, path), f"{path} key {s.key!r}")
                p = sample_view_params(self.recipe, self.seed, s.key, self.epoch, *image.shape[1:])
                yield replay_view(image, p, self.resolution), int(s.fields["cls"])


def train_demo_teacher(train_dir: str, out: Path, recipe: TeacherRecipe, progress: bool = True) -> dict:
    """Train ``recipe.arch`` with labels and save its state dict to ``out``; returns timing and train accuracy."""
    torch.manual_seed(recipe.seed)
    classes = len({int(s.fields["cls"]) for p in list_shards(train_dir) for s in iter_samples(p.path)})
    device = pick_device(recipe.device)
    model = torchvision.models.get_model(recipe.arch, num_classes=classes).to(device)
    opt = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay, nesterov=True
    )
    data = LabelledViews(train_dir, recipe.resolution, recipe.seed)
    start, correct, seen = time.perf_counter(), 0, 0
    steps_per_epoch = math.ceil(sum(s.samples or 0 for s in list_shards(train_dir)) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    bar = progress_bar(total=total, desc="demo teacher", unit="step", disable=not progress, mininterval=1.0)
    step = 0
    for epoch in range(recipe.epochs):
        data.epoch = epoch
        model.train()
        correct, seen = 0, 0
        for x, y in DataLoader(data, batch_size=recipe.batch_size, num_workers=2, shuffle=False):
            x, y = x.to(device), y.to(device)
            for g in opt.param_groups:
                g["lr"] = recipe.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{correct / max(seen, 1):.2f}")
    bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save(model.cpu().state_dict(), tmp)
    return {
        "seconds": time.perf_counter() - start,
        "train_top1_last_epoch": correct / max(seen, 1),
        "classes": classes,
        "arch": recipe.arch,
        "epochs": recipe.epochs,
        "resolution": recipe.resolution,
    }
