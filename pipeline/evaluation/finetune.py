"""Full fine-tuning of a backbone on a labelled split: the KDEP downstream recipe, scaled down.

    from pipeline.evaluation.finetune import FinetuneRecipe, finetune
    top1 = finetune(model, "out/demo/data/train", "out/demo/data/val", num_classes=10, resolution=64,
                    recipe=FinetuneRecipe(epochs=3), seed=0)

KDEP supplement B.2 (image classification): backbone initialised from the distilled weights plus a randomly
initialised linear classifier; 150 epochs, batch size 64, weight decay 5e-4, initial lr in {0.01, 0.001} dropped
by 10x at 1/3 and 2/3 of the epochs; RandomResizedCrop(224) + horizontal flip. The optimiser is SGD; the
supplement does not state the momentum, so 0.9 (the usual value, and KDEP's pre-training momentum) is assumed.
Here the epochs and the resolution are whatever the caller configures (CPU-friendly at low resolution).

Training views are the ``paper`` recipe (RandomResizedCrop 0.08-1 + flip) replayed through
:func:`pipeline.data.views.replay_view` with view index = epoch, so a run is reproducible from its seed; the sample
order of each epoch is a seeded permutation. Encoded images are held in memory and decoded per step.
Evaluation is top-1 on the centre views of the val split.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.data.shards import Sample, ShardInfo, iter_samples, list_shards
from pipeline.evaluation.features import (
    head_name,
    iter_view_batches,
    make_view,
    prepare_model,
    resolve_device,
    sample_label,
    swap_module,
)
from pipeline.progress import progress_bar


@dataclass(frozen=True)
class FinetuneRecipe:
    """Optimiser and schedule of the downstream fine-tuning (defaults: KDEP supplement B.2)."""

    epochs: int = 150  # passes over the train split; lr / 10 at 1/3 and 2/3 of them
    lr: float = 0.01  # initial learning rate (the paper picks 0.01 or 0.001 per task)
    weight_decay: float = 5e-4  # SGD weight decay
    momentum: float = 0.9  # SGD momentum (not stated in the paper; assumed)
    batch_size: int = 64  # images per step
    view_recipe: str = "paper"  # training augmentation (pipeline.data.views.RECIPES)


def read_labelled(shards: list[ShardInfo]) -> list[tuple[Sample, str, int]]:
    """Every sample of ``shards`` with its shard name and label, encoded bytes kept in memory."""
    return [(s, info.name, sample_label(s, info.name)) for info in shards for s in iter_samples(info.path)]


def with_new_head(model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """Replace the model's last ``nn.Linear`` by a seeded, randomly initialised one with ``num_classes`` outputs."""
    name = head_name(model)
    torch.manual_seed(seed)
    old = model.get_submodule(name)
    swap_module(model, name, nn.Linear(old.in_features, num_classes))
    return model


def step_factor(epoch: int, epochs: int) -> float:
    """The lr multiplier of ``epoch``: 1, then 0.1 from epoch >= epochs/3, then 0.01 from epoch >= 2*epochs/3."""
    return 0.1 ** ((epoch >= epochs / 3) + (epoch >= 2 * epochs / 3))


def train_batches(
    data: list[tuple[Sample, str, int]], epoch: int, recipe: FinetuneRecipe, resolution: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (B, 3, res, res) augmented views and (B,) labels for one epoch, in a seeded order."""
    order = np.random.default_rng([seed, epoch]).permutation(len(data))
    for start in range(0, len(order), recipe.batch_size):
        chunk = [data[i] for i in order[start : start + recipe.batch_size]]
        if len(chunk) < 2:
            continue  # BatchNorm cannot train on one image at 1x1 spatial size
        views = [make_view(s, where, resolution, recipe.view_recipe, seed, epoch) for s, where, _ in chunk]
        yield torch.stack(views), torch.tensor([y for _, _, y in chunk])


def train_epoch(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    data: list[tuple[Sample, str, int]],
    epoch: int,
    recipe: FinetuneRecipe,
    resolution: int,
    seed: int,
    device: torch.device,
) -> float:
    """One epoch of cross-entropy training; returns the mean loss."""
    model.train()
    losses = []
    for x, y in train_batches(data, epoch, recipe, resolution, seed):
        x, y = x.to(device), y.to(device)
        if device.type == "cuda":
            x = x.to(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def classify_top1(
    model: nn.Module, shards: list[ShardInfo], resolution: int, batch_size: int, device: torch.device
) -> float:
    """Top-1 of ``model``'s logits on the centre views of ``shards``."""
    model.eval()
    correct = total = 0
    for x, y, _ in iter_view_batches(shards, resolution, batch_size):
        x = x.to(device)
        if device.type == "cuda":
            x = x.to(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(x).argmax(1).cpu().numpy()
        correct += int((pred == y).sum())
        total += len(y)
    return correct / max(total, 1)


def finetune(
    model: nn.Module,
    train: str | list[ShardInfo],
    val: str | list[ShardInfo],
    num_classes: int,
    resolution: int,
    recipe: FinetuneRecipe,
    seed: int = 0,
    device: str = "cpu",
) -> float:
    """Fine-tune ``model`` (all layers, new head) on ``train``; returns val top-1. ``model`` is modified."""
    dev = resolve_device(device)
    train = list_shards(train) if isinstance(train, str) else train
    val = list_shards(val) if isinstance(val, str) else val
    model = prepare_model(with_new_head(model, num_classes, seed), dev)
    data = read_labelled(train)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(
        params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda e: step_factor(e, recipe.epochs))
    for epoch in progress_bar(range(recipe.epochs), desc="fine-tune", unit="epoch", leave=False):
        train_epoch(model, optimiser, data, epoch, recipe, resolution, seed, dev)
        schedule.step()
    return classify_top1(model, val, resolution, recipe.batch_size, dev)
