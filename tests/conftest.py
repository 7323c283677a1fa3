"""Shared fixtures: tiny demo shards made once per session (no download, seconds on CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision

from pipeline.demo.shards import DemoSpec, write_demo_data

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """4 classes x 6 train / 3 val images, 8 per shard: 3 train shards, 2 val shards."""
    out = tmp_path_factory.mktemp("demo")
    return write_demo_data(DemoSpec(seed=3, classes=4, train_per_class=6, val_per_class=3, per_shard=8), out)


def store_bytes(path: Path) -> dict[str, bytes]:
    """Every file of a feature store except the run log, the lock and the resolved config (times, pids, hosts)."""
    skip = {"runs.jsonl", "writer.lock", "config.cache_teacher.json"}
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name not in skip
    }


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init ResNet-18 (4 classes, seed 0) saved as a state-dict file: the tests' teacher weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "teacher-r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), path)
    return path
