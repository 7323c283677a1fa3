"""CoSS neighbour mining against brute force, the batch sampler's structure, and a CoSS run on a centre-view cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from pipeline.cache.store import open_store
from pipeline.data.shards import list_shards
from pipeline.student.neighbours import (
    NeighbourBatchSampler,
    NeighbourError,
    RandomAccessPairs,
    centre_view_rows,
    mine_neighbours,
    mine_neighbours_once,
)
from stages.cache_teacher import CacheTeacherConfig
from stages.cache_teacher import run as cache_run
from stages.train_student import TrainStudentConfig
from stages.train_student import run as train_run


def test_mined_neighbours_equal_brute_force_cosine_top_k():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    got = mine_neighbours(x, pool=5, chunk=7)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    want = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(got, want)
    with pytest.raises(NeighbourError, match="needs more than 50 images"):
        mine_neighbours(x, pool=50)


def test_mining_on_a_device_and_once_for_all_ranks_gives_the_same_table():
    """``device`` moves the similarity matmuls (the GPU on CUDA runs); without a process group (or on one rank)
    ``mine_neighbours_once`` is the plain mining, which rank 0 broadcasts under DDP."""
    x = np.random.default_rng(3).normal(size=(50, 8)).astype(np.float32)
    plain = mine_neighbours(x, pool=5, chunk=7)
    np.testing.assert_array_equal(mine_neighbours(x, pool=5, chunk=7, device=torch.device("cpu")), plain)
    np.testing.assert_array_equal(mine_neighbours_once(x, 5, torch.device("cpu")), mine_neighbours(x, pool=5))
    with pytest.raises(NeighbourError, match="needs more than 50 images"):
        mine_neighbours_once(x, 50, torch.device("cpu"))
    with pytest.raises(NeighbourError, match="50 images make no batch of 30 anchors on 2 rank"):
        NeighbourBatchSampler(plain, anchors=30, per_anchor=2, seed=0, rank=0, world=2)


def _broadcast_worker(rank: int, path: str, x: np.ndarray, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    mine = x if rank == 0 else x[::-1].copy()  # rank 1's own mining would differ: it must get rank 0's table
    np.save(f"{out}-{rank}.npy", mine_neighbours_once(mine, 5, torch.device("cpu")))
    dist.destroy_process_group()


def test_rank_zero_mines_and_every_rank_gets_its_table(tmp_path):
    x = np.random.default_rng(4).normal(size=(30, 6)).astype(np.float32)
    torch.multiprocessing.spawn(
        _broadcast_worker, args=(str(tmp_path / "pg"), x, str(tmp_path / "nb")), nprocs=2
    )
    for rank in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"nb-{rank}.npy"), mine_neighbours(x, pool=5))


def test_sampler_groups_anchor_with_neighbours_from_its_pool_and_splits_ranks():
    nb = mine_neighbours(np.random.default_rng(1).normal(size=(40, 4)).astype(np.float32), pool=6)
    per_rank = []
    for rank in range(2):
        sampler = NeighbourBatchSampler(nb, anchors=3, per_anchor=2, seed=0, rank=rank, world=2)
        sampler.set_epoch(1)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 40 // 6
        for batch in batches:
            assert len(batch) == 9
            for g in range(3):
                anchor, *friends = batch[3 * g : 3 * g + 3]
                assert set(friends) <= set(nb[anchor].tolist()) and anchor not in friends
        per_rank.append({b[0] for b in batches})
    assert not per_rank[0] & per_rank[1]


def test_coss_with_neighbour_batches_on_a_centre_view_cache(demo_shards, tmp_path, monkeypatch):
    import zarr

    from pipeline.cache import store as store_module

    monkeypatch.setattr(store_module, "INNER_CHUNK_BYTES", 1024)  # one 512-wide float16 row per inner chunk
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), tmp_path / "t.pt")
    cache = tmp_path / "cache.zarr"
    cache_run(
        CacheTeacherConfig(
            shards=str(demo_shards["train"]),
            out=str(cache),
            teacher="resnet18",
            weights=str(tmp_path / "t.pt"),
            taps=("post_relu",),
            views=3,
            center_view=True,
            recipe="coss",
            resolution=32,
            batch_size=6,
            workers=0,
            device="cpu",
            quiet=True,
        )
    )
    store = open_store(cache)
    rows, centre = centre_view_rows(store, "post_relu")
    assert len(rows) == 24 and centre.shape == (24, 512)
    paths = tuple(s.path for s in list_shards(demo_shards["train"]))
    ds = RandomAccessPairs(str(cache), paths, rows, "post_relu", 32, seed=0)
    x, feat, ids = ds[5]
    shard, row, view = (int(v) for v in ids)
    assert shard * store.layout.slot_rows + row == rows[5]
    np.testing.assert_array_equal(feat.numpy(), store.read_slot(shard).features["post_relu"][row, view])
    assert store.layout.inner_rows == 1
    # a neighbour batch reads only its rows: count the feature bytes read through zarr's store
    read: dict[str, int] = {}
    original = zarr.storage.LocalStore.get

    async def counting(self, key, prototype=None, byte_range=None):
        buf = await original(self, key, prototype, byte_range)
        if buf is not None and key.startswith("features/"):
            read[key] = read.get(key, 0) + len(buf)
        return buf

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting)
    batch = [0, 9, 17]  # rows of three different shards
    items = ds.__getitems__(batch)
    index = 16 * store.layout.slot_rows + 4  # a Zarr shard's index: offset and length per inner chunk, crc32c
    assert len(read) == 3 and all(n <= index + 512 * 2 + 64 for n in read.values())  # one row each, of 8
    for i, (_x, f, ids) in zip(batch, items, strict=True):
        np.testing.assert_array_equal(f.numpy(), ds[i][1].numpy())
        assert tuple(int(v) for v in ids) == tuple(int(v) for v in ds[i][2])
    result = train_run(
        TrainStudentConfig(
            cache=str(cache),
            student=("mobilenet_v2",),
            out=str(tmp_path / "run"),
            loss="coss",
            tap="post_relu",
            student_tap="post_relu",
            neighbours=2,
            neighbour_pool=4,
            anchors=3,
            epochs=1,
            workers=0,
            device="cpu",
            quiet=True,
        )
    )
    assert np.isfinite(result["students"]["mobilenet_v2"]["loss"])
    import json

    epoch = [
        json.loads(x)
        for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"kind": "epoch"' in x
    ]
    assert epoch[0]["images"] == (24 // 3) * 3 * 3  # 8 batches of 3 anchors x (1 + 2 neighbours)
