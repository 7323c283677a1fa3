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
order of each epoch is one seeded permutation. Images are read from the shards by byte range (an index of the
tar headers, never a copy of the encoded images in memory) and decoded by DataLoader workers (one loader for the
whole run, pipeline/evaluation/train_samples.py), so the batches do not depend on the worker count.
The model sees views re-normalised with its own mean/std (a no-op for ImageNet's, e.g. every torchvision model).
Evaluation is top-1 on the centre views of the val split.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.data.shards import ShardInfo, list_shards
from pipeline.evaluation.batches import batch_loader, iter_view_batches
from pipeline.evaluation.features import (
    eval_numerics,
    head_name,
    prepare_model,
    resolve_device,
    swap_module,
)
from pipeline.evaluation.train_samples import EpochBatches, index_samples
from pipeline.models import Renormalize, model_preprocessing
from pipeline.progress import progress_bar
from pipeline.runtime import autocast_for


@dataclass(frozen=True)
class FinetuneRecipe:
    """Optimiser and schedule of the downstream fine-tuning (defaults: KDEP supplement B.2)."""

    epochs: int = 150  # passes over the train split; lr / 10 at 1/3 and 2/3 of them
    lr: float = 0.01  # initial learning rate (the paper picks 0.01 or 0.001 per task)
    weight_decay: float = 5e-4  # SGD weight decay
    momentum: float = 0.9  # SGD momentum (not stated in the paper; assumed)
    batch_size: int = 64  # images per step
    view_recipe: str = "paper"  # training augmentation (pipeline.data.views.RECIPES)


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


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, 3, r, r) views on ``device`` (channels_last on CUDA, from pinned memory without blocking)."""
    x = x.to(device, non_blocking=True)
    return x.to(memory_format=torch.channels_last) if device.type == "cuda" else x


def train_epoch(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
) -> float:
    """One epoch of cross-entropy training on (B, 3, r, r) views and (B,) labels; returns the mean loss."""
    model.train()
    losses = []
    for x, y in batches:
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        with autocast_for(device, eval_numerics(device)["amp"]):
            loss = nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def classify_top1(
    model: nn.Module,
    shards: list[ShardInfo],
    resolution: int,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
) -> float:
    """Top-1 of ``model``'s logits on the centre views of ``shards``."""
    model.eval()
    correct = total = 0
    for _, x, y, _ in iter_view_batches(shards, resolution, batch_size, workers=workers, device=device):
        with autocast_for(device, eval_numerics(device)["amp"]):
            pred = model(to_device(x, device)).argmax(1).cpu().numpy()
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
    workers: int = 0,
) -> float:
    """Fine-tune ``model`` (all layers, new head) on ``train``; returns val top-1. ``model`` is modified.
    ``workers`` DataLoader processes decode the views (the same batches for any count)."""
    dev = resolve_device(device)
    train = list_shards(train) if isinstance(train, str) else train
    val = list_shards(val) if isinstance(val, str) else val
    own = Renormalize(model_preprocessing(model))  # ImageNet-normalised views -> the model's normalisation
    model = prepare_model(nn.Sequential(own, with_new_head(model, num_classes, seed)), dev)
    data = index_samples(train)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(
        params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda e: step_factor(e, recipe.epochs))
    epochs = EpochBatches(data, recipe.epochs, recipe.batch_size, resolution, recipe.view_recipe, seed)
    loader = iter(batch_loader(epochs, workers, dev))  # one loader, its workers kept for the whole run
    for epoch in progress_bar(range(recipe.epochs), desc="fine-tune", unit="epoch", leave=False):
        train_epoch(model, optimiser, epoch_items(loader, epoch, epochs.per_epoch), dev)
        schedule.step()
    return classify_top1(model, val, resolution, recipe.batch_size, dev, workers)


def epoch_items(loader: Iterator, epoch: int, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The next ``count`` (views, labels) batches of ``loader``, which must belong to ``epoch``."""
    for _ in range(count):
        got, x, y = next(loader)
        if got != epoch:
            raise RuntimeError(f"fine-tune loader gave a batch of epoch {got} during epoch {epoch}")
        yield x, y
