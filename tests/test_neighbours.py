"""CoSS neighbour mining against brute-force float32 cosine top-k (in float32 and float16/bfloat16 tiles, on one and
two ranks), the batch sampler's guarantees (and its anchors against the per-anchor loop it replaced), the per-row
metadata and offset reads of the random-access dataset against the store and the tar index, and a CoSS run on a
centre-view cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from benchmarks.bench_neighbours import old_mining
from pipeline.cache.store import open_store
from pipeline.data.shards import list_shards, split_member_name
from pipeline.student.mining import Blocks, mine_shared, share_bounds
from pipeline.student.neighbour_pairs import load_row_meta
from pipeline.student.neighbours import (
    NeighbourBatchSampler,
    NeighbourError,
    RandomAccessPairs,
    centre_view_rows,
    mine_neighbours,
    mine_neighbours_once,
    neighbour_table,
    valid_rows,
)
from pipeline.student.pairs import _stable_int
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


def _shared_worker(rank: int, path: str, x: np.ndarray, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    lo, hi = share_bounds(len(x), rank, 2)
    mine = np.full_like(x, np.nan)  # a rank reads only its share: another rank's rows would poison the table
    mine[lo:hi] = x[lo:hi]
    np.save(f"{out}-{rank}.npy", mine_neighbours_once(mine, 5, torch.device("cpu")))
    stats: dict = {}
    half = mine_shared(x[lo:hi], len(x), 5, "cpu", torch.float16, Blocks(4, 16), margin=0, stats=stats)
    np.save(f"{out}-half-{rank}.npy", half)
    np.save(f"{out}-rechecked-{rank}.npy", stats["rechecked"])
    dist.destroy_process_group()


def test_each_rank_mines_its_share_and_every_rank_gets_the_whole_table(tmp_path):
    """Two gloo ranks, each holding only its share of the rows (the rest NaN): both end with the one-process table,
    also in float16 tiles with no margin (clusters in row order, so a query's neighbours share its key block and the
    cut is unproven: queries are re-mined exactly, over both ranks' key blocks)."""
    rng = np.random.default_rng(4)
    centres, cluster = rng.normal(size=(4, 6)), np.sort(rng.integers(0, 4, 31))
    x = (centres[cluster] + 0.2 * rng.normal(size=(31, 6))).astype(np.float32)
    torch.multiprocessing.spawn(
        _shared_worker, args=(str(tmp_path / "pg"), x, str(tmp_path / "nb")), nprocs=2
    )
    want = _brute_force(x, 5)
    for rank in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"nb-{rank}.npy"), want)
        np.testing.assert_array_equal(np.load(tmp_path / f"nb-half-{rank}.npy"), want)
        assert int(np.load(tmp_path / f"nb-rechecked-{rank}.npy")) > 0  # the same count on both ranks
    assert np.load(tmp_path / "nb-rechecked-0.npy") == np.load(tmp_path / "nb-rechecked-1.npy")


def _brute_force(x: np.ndarray, pool: int, exact: bool = True) -> np.ndarray:
    """Cosine top-``pool`` of each row among the others, ties to the lower row (numpy, all pairs): rows normalised in
    float32 by torch (the miner's unit rows); scores computed in float64 and rounded to float32 (``exact``), or
    computed in float32 (numpy's matmul)."""
    unit = torch.nn.functional.normalize(torch.from_numpy(x).float(), dim=1).numpy()
    sims = (
        (unit.astype(np.float64) @ unit.T.astype(np.float64)).astype(np.float32) if exact else unit @ unit.T
    )
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :pool]


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """float16-valued rows around 12 centres: many close neighbours, as among real images."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, d))
    x = centres[rng.integers(0, 12, n)] + 0.25 * rng.normal(size=(n, d))
    return x.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk, margin", [(64, 32), (600, 0), (600, 3)])
def test_low_precision_tiles_give_the_float32_table(dtype, chunk, margin):
    """Whatever the tile precision, tile size and candidate margin, the table is the brute-force one (correctly
    rounded float32 scores): each tile's candidates are re-scored in float64, and queries that a left-out candidate
    could still beat (by the rounding bound) are mined again exactly; with one whole tile and no margin that is every
    query."""
    x = _clustered(600, 48)
    stats: dict = {}
    got = mine_neighbours(x, 31, chunk=chunk, dtype=dtype, margin=margin, stats=stats)
    np.testing.assert_array_equal(got, _brute_force(x, 31))
    assert got.dtype == np.int32
    if (chunk, margin) == (600, 0):
        assert stats["rechecked"] == 600  # one tile, its own top-31 only: nothing proves the cut
    if (chunk, margin) == (64, 32) and dtype != torch.float32:
        assert stats["rechecked"] < 60


def test_on_random_data_the_table_is_todays_float32_one():
    """Random rows (no two candidates within float32 rounding of each other): the table, from float16 or float32
    tiles, equals the float32 mining it replaced and the float32 brute force."""
    x = np.random.default_rng(6).normal(size=(700, 64)).astype(np.float16).astype(np.float32)
    today = old_mining(x, 31, chunk=256)  # the mining the module replaced, as it was
    np.testing.assert_array_equal(today, _brute_force(x, 31, exact=False))
    for dtype in (torch.float16, torch.float32):
        np.testing.assert_array_equal(mine_neighbours(x, 31, chunk=128, dtype=dtype), today)


def test_the_low_precision_order_alone_differs_from_float32_on_this_data():
    """Why the re-scoring exists: ranking by float16 / bfloat16 scores alone changes some rows' top-31 here."""
    x = _clustered(600, 48)
    unit = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    want = _brute_force(x, 31)
    for dtype in (torch.float16, torch.bfloat16):
        sims = (unit.to(dtype) @ unit.to(dtype).T).float()
        sims.fill_diagonal_(-float("inf"))
        low = torch.argsort(-sims, dim=1, stable=True)[:, :31].numpy()
        assert (low != want).any(axis=1).sum() > 0, dtype


def test_ties_go_to_the_lower_row():
    """Rows of four +-1 entries (norm 2) have cosines in quarters, computed exactly in any precision and order: many
    exact ties, also at the cut. The table lists tied rows lowest first, in any tiling, margin and precision."""
    rng = np.random.default_rng(5)
    x = np.zeros((150, 8), np.float32)
    for row in x:
        row[rng.choice(8, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    want = _brute_force(x, 9)
    sims = np.sort((x @ x.T / 4 - 3 * np.eye(150)), axis=1)[:, ::-1]
    assert (sims[:, 8] == sims[:, 9]).mean() > 0.5  # the 9th and 10th are tied in most rows
    for chunk, dtype, margin in [(0, torch.float32, 32), (7, torch.float32, 0), (13, torch.float16, 2),
                                 (150, torch.bfloat16, 0)]:  # fmt: skip
        np.testing.assert_array_equal(mine_neighbours(x, 9, chunk=chunk, dtype=dtype, margin=margin), want)


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


def _todays_batches(
    nb: np.ndarray, anchors: int, per_anchor: int, seed: int, epoch: int, rank: int, world: int
):
    """The per-anchor loop the sampler replaced (every rank built all N groups), as it was."""
    rng = np.random.default_rng(_stable_int(seed, "anchors", epoch))
    order = rng.permutation(nb.shape[0])
    groups = [[int(a), *(int(v) for v in rng.choice(nb[a], per_anchor, replace=False))] for a in order]
    usable = len(groups) // (anchors * world) * anchors * world
    return [sum(groups[i : i + anchors], []) for i in range(0, usable, anchors)][rank::world]


@pytest.mark.parametrize("world", [1, 3])
def test_sampler_keeps_todays_anchors_and_guarantees(world):
    """Against the loop it replaced: the same anchors in the same batches on every rank (disjoint over ranks), the
    same number of steps; each group an anchor and ``per_anchor`` distinct rows of its top-``pool``; the same
    (seed, epoch, rank) gives the same batches, another epoch or seed others."""
    rng = np.random.default_rng(2)  # a pool of 7 distinct other rows per row, as mining gives
    nb = np.array([rng.choice(np.delete(np.arange(103), a), 7, replace=False) for a in range(103)], np.int32)
    for epoch in (0, 1, 5):
        seen = []
        for rank in range(world):
            sampler = NeighbourBatchSampler(nb, anchors=4, per_anchor=3, seed=9, rank=rank, world=world)
            sampler.set_epoch(epoch)
            got = list(sampler)
            today = _todays_batches(nb, 4, 3, 9, epoch, rank, world)
            assert len(got) == len(today) == len(sampler) == 103 // (4 * world)
            groups = np.array(got).reshape(-1, 4)
            np.testing.assert_array_equal(groups[:, 0], np.array(today).reshape(-1, 4)[:, 0])
            for anchor, *friends in groups.tolist():
                assert (
                    len(set(friends)) == 3
                    and set(friends) <= set(nb[anchor].tolist())
                    and anchor not in friends
                )
            again = NeighbourBatchSampler(nb, anchors=4, per_anchor=3, seed=9, rank=rank, world=world)
            again.set_epoch(epoch)
            assert list(again) == got
            seen.append(groups[:, 0])
        anchors = np.concatenate(seen)
        assert len(set(anchors.tolist())) == len(anchors)  # disjoint over ranks, no anchor twice
    other = NeighbourBatchSampler(nb, anchors=4, per_anchor=3, seed=9, world=1)
    firsts = []
    for epoch in (0, 1):
        other.set_epoch(epoch)
        firsts.append(list(other))
    assert firsts[0] != firsts[1]
    other.seed = 10
    assert list(other) != firsts[1]


def test_sampler_draws_each_pool_slot_as_often_as_todays():
    """The neighbours are a uniform draw from the pool: over 400 epochs every slot of a pool of 6 is drawn for
    2 of its 6 chances (1/3), as by the loop it replaced, within 3 standard deviations."""
    nb = np.arange(1, 61, dtype=np.int32)[:, None] + np.arange(6, dtype=np.int32)[None, :]
    nb = nb % 60
    counts = np.zeros(6)
    sampler = NeighbourBatchSampler(nb, anchors=5, per_anchor=2, seed=0, world=1)
    for epoch in range(400):
        sampler.set_epoch(epoch)
        for batch in sampler.batches():
            groups = batch.reshape(5, 3)
            counts += (nb[groups[:, 0]][:, :, None] == groups[:, None, 1:]).any(axis=2).sum(axis=0)
    chances = 400 * 60
    sd = np.sqrt(chances * (1 / 3) * (2 / 3))
    assert np.all(np.abs(counts - chances / 3) < 3 * sd), counts


@pytest.fixture(scope="module")
def coss_cache(demo_shards, tmp_path_factory) -> dict:
    """A centre-view cache of the demo train split (ResNet-18, post-ReLU, 3 views, one 512-wide float16 row per
    inner chunk) as cache-teacher makes it (``cache``, with ``member_offset``), a copy as a cache made before offsets
    were recorded holds it (``old``, without), and its shard paths."""
    import shutil

    from pipeline.cache import store as store_module

    d = tmp_path_factory.mktemp("coss")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), d / "t.pt")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store_module, "INNER_CHUNK_BYTES", 1024)
        cache_run(CacheTeacherConfig(shards=str(demo_shards["train"]), out=str(d / "cache.zarr"), teacher="resnet18",
                                     weights=str(d / "t.pt"), taps=("post_relu",), views=3, center_view=True,
                                     recipe="coss", resolution=32, batch_size=6, workers=0, device="cpu",
                                     quiet=True))  # fmt: skip
    shutil.copytree(d / "cache.zarr", d / "old.zarr")
    shutil.rmtree(d / "old.zarr" / "store.zarr" / "member_offset")
    paths = tuple(s.path for s in list_shards(demo_shards["train"]))
    return {"cache": d / "cache.zarr", "old": d / "old.zarr", "paths": paths}


def test_coss_with_neighbour_batches_on_a_centre_view_cache(coss_cache, tmp_path, monkeypatch):
    import zarr

    cache = coss_cache["cache"]
    store = open_store(cache)
    rows, centre = centre_view_rows(store, "post_relu")
    assert len(rows) == 24 and centre.shape == (24, 512)
    paths = coss_cache["paths"]
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


def _tar_offsets(store, paths: tuple[str, ...], rows: np.ndarray) -> np.ndarray:
    """Each of global ``rows``' first tar header in its shard, found independently with tarfile."""
    import tarfile

    r, out = store.layout.slot_rows, []
    for g in rows.tolist():
        key = store.read_slot(g // r, taps=[], views=[]).keys[g % r]
        with tarfile.open(paths[g // r]) as tar:
            out.append(next(m.offset for m in tar if split_member_name(m.name)[0] == key))
    return np.array(out, np.int64)


@pytest.mark.parametrize("which", ["cache", "old"])
def test_row_metadata_is_read_once_per_worker_in_runs_of_slots(coss_cache, which):
    """``load_row_meta``: keys, hashes and sizes of rows in any order equal each slot's own block, read in runs of
    one slot or of all; keys as narrow as the longest one; the tar offsets the cache records (the tar's own), or
    none from a cache made before they were recorded."""
    store = open_store(coss_cache[which])
    rows = valid_rows(store)[::-1][[3, 0, 17, 9, 23]]
    r = store.layout.slot_rows
    for run in (1, 64):
        meta = load_row_meta(store, rows, run=run)
        for i, g in enumerate(rows):
            block = store.read_slot(int(g // r), taps=[], views=[])
            assert meta.keys[i].decode() == block.keys[g % r]
            np.testing.assert_array_equal(meta.hashes[i], block.hashes[g % r])
            np.testing.assert_array_equal(meta.hw[i], block.hw[g % r])
        assert meta.keys.dtype.itemsize == max(len(k) for k in meta.keys)
        if which == "old":
            assert meta.offsets is None
            assert meta.nbytes == len(rows) * (meta.keys.dtype.itemsize + 16 + 8)
        else:
            np.testing.assert_array_equal(meta.offsets, _tar_offsets(store, coss_cache["paths"], rows))
            assert meta.nbytes == len(rows) * (meta.keys.dtype.itemsize + 16 + 8 + 8)


def test_offsets_read_images_without_indexing_tars_and_equal_the_indexed_reads(
    coss_cache, tmp_path, monkeypatch
):
    """With ``member_offset`` in the cache, a batch reads each image at its offset (no tar is indexed) and yields
    exactly what the tar-scan fallback yields; a wrong offset is an error naming the shard, key and byte."""
    from pipeline.data.shards import ShardError
    from pipeline.student import neighbour_pairs

    paths, cache = coss_cache["paths"], coss_cache["cache"]
    rows = valid_rows(open_store(cache))
    indexed = RandomAccessPairs(
        str(coss_cache["old"]), paths, rows, "post_relu", 32, seed=0, uint8_views=True
    )
    want = indexed.__getitems__(list(range(24)))
    by_offset = RandomAccessPairs(str(cache), paths, rows, "post_relu", 32, seed=0, uint8_views=True)
    monkeypatch.setattr(neighbour_pairs, "index_tar", lambda path: pytest.fail(f"indexed {path}"))
    got = by_offset.__getitems__(list(range(24)))
    assert by_offset.meta.offsets is not None and (by_offset.meta.offsets >= 0).all()
    for (x, f, ids), (wx, wf, wids) in zip(got, want, strict=True):
        assert torch.equal(x, wx) and torch.equal(f, wf) and torch.equal(ids, wids)
    wrong = by_offset.meta.offsets.copy()
    wrong[5] = by_offset.meta.offsets[6]  # row 5's offset points at row 6's sample
    object.__setattr__(by_offset.meta, "offsets", wrong)
    key = by_offset.meta.keys[5].decode()
    with pytest.raises(ShardError, match=f"{paths[0]}: sample '{key}' is not at byte {wrong[5]} .found"):
        by_offset[5]


def test_a_batch_rereads_no_metadata_and_an_epoch_reads_each_shards_parameters_once(coss_cache, monkeypatch):
    """No bounded cache to thrash: after the first batch, batches over the same shards read only features; a new
    epoch reads each touched shard's view parameters once, and keeps no earlier epoch's."""
    from pipeline.cache.store import FeatureStore
    from pipeline.student import neighbour_pairs

    loads, params = [], []
    original_load, original_params = neighbour_pairs.load_row_meta, FeatureStore.read_view_params
    monkeypatch.setattr(
        neighbour_pairs, "load_row_meta", lambda *a, **k: loads.append(1) or original_load(*a, **k)
    )
    monkeypatch.setattr(FeatureStore, "read_view_params",
                        lambda self, s, v: params.append((s, v)) or original_params(self, s, v))  # fmt: skip
    rows = valid_rows(open_store(coss_cache["cache"]))
    ds = RandomAccessPairs(str(coss_cache["cache"]), coss_cache["paths"], rows, "post_relu", 32, seed=0)
    ds.__getitems__([0, 9, 17, 20])
    ds.__getitems__([1, 10, 18, 2])
    assert len(loads) == 1 and sorted(s for s, _ in params) == [0, 1, 2]
    ds.set_epoch(1)
    ds.__getitems__([3, 11, 19])
    ds.__getitems__([4, 12, 21])
    assert len(loads) == 1 and sorted(s for s, _ in params[3:]) == [0, 1, 2]
    assert sorted(ds._epoch_plan()[2]) == [0, 1, 2]  # this epoch's parameters only
    assert [v for _, v in params[3:]] == [int(ds.shard_views()[s]) for s, _ in params[3:]]


def test_without_offsets_each_touched_tar_is_scanned_once_per_worker_into_one_int64_per_row(
    coss_cache, tmp_path, monkeypatch
):
    """A cache without ``member_offset``: a worker scans the headers of each shard it touches once (however many
    batches touch it) and keeps only each row's offset (no per-shard key map); a shard that lost a cached key is an
    error naming the shard and the key."""
    from pipeline.student import neighbour_pairs

    scans = []
    original = neighbour_pairs.index_tar
    monkeypatch.setattr(neighbour_pairs, "index_tar", lambda path: scans.append(path) or original(path))
    paths = coss_cache["paths"]
    rows = valid_rows(open_store(coss_cache["old"]))
    ds = RandomAccessPairs(str(coss_cache["old"]), paths, rows, "post_relu", 32, seed=0, uint8_views=True)
    ds.__getitems__([0, 9, 17])
    ds.__getitems__([20, 1, 10, 23])
    assert sorted(scans) == sorted(paths)
    assert ds._found.dtype == np.int64 and ds._found.shape == (24,) and (ds._found >= 0).all()
    monkeypatch.setattr(neighbour_pairs, "index_tar", lambda path: {})  # the shard lost its samples
    fresh = RandomAccessPairs(str(coss_cache["old"]), paths, rows, "post_relu", 32, seed=0)
    key = fresh.meta.keys[0].decode()
    with pytest.raises(NeighbourError, match=f"{paths[0]}: cached key '{key}' is not in the shard"):
        fresh[0]


def test_the_table_of_the_demo_cache_has_todays_neighbour_sets(coss_cache):
    """The rows' neighbour sets on a real (demo) centre-view cache are the ones the code before the rewrite mined:
    float32 copies of all rows, chunk x N float32 similarities, torch.topk."""
    store = open_store(coss_cache["cache"])
    rows, table = neighbour_table(store, "post_relu", 7, torch.device("cpu"))
    feats = store.feature_array("post_relu")[:, 0, :][rows].astype(np.float32)
    x = torch.nn.functional.normalize(torch.from_numpy(feats), dim=1)
    sims = x @ x.T
    sims.fill_diagonal_(-float("inf"))
    today = sims.topk(7, dim=1).indices.numpy()
    assert table.dtype == np.int32 and table.shape == (24, 7)
    assert [set(a) for a in table.tolist()] == [set(b) for b in today.tolist()]
