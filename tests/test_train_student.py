"""Stage 3 against references: one step from the cache equals the online teacher's step on the same batch; every
scheduled (image, view) appears exactly once across 2 workers x 2 ranks; the key join catches missing and changed
images; a killed-then-resumed run reproduces the uninterrupted weights; the backbone loads into torchvision."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import DataLoader

from pipeline.cache.join import JoinError, SourceError, rebuild_teacher
from pipeline.cache.store import StoreError, open_store
from pipeline.data.shards import iter_samples, list_shards, write_shard
from pipeline.models import ModelError
from pipeline.projection.artefact import load_projection
from pipeline.provenance import ProvenanceError
from pipeline.student.pairs import (
    PairStream,
    StreamSpec,
    consumer_id,
    consumer_plan,
    epoch_fingerprint,
    fingerprint,
    scheduled_view,
    training_views,
)
from pipeline.student.training import LossSpec, StepContext, Student, train_step
from stages.cache_teacher import CacheTeacherConfig
from stages.cache_teacher import run as cache_run
from stages.fit_svd import FitSvdConfig
from stages.fit_svd import run as fit_run
from stages.train_student import TrainStudentConfig
from stages.train_student import run as train_run


@pytest.fixture(scope="module")
def cached(demo_shards, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("s3")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), d / "teacher.pt")
    cache_run(CacheTeacherConfig(shards=str(demo_shards["train"]), out=str(d / "cache.zarr"), teacher="resnet18",
                                 weights=str(d / "teacher.pt"), views=3, resolution=32, batch_size=6, workers=0,
                                 device="cpu", quiet=True))  # fmt: skip
    fit_run(FitSvdConfig(cache=str(d / "cache.zarr"), out=str(d / "proj.npz"), dim=512, quiet=True))
    return {"dir": d, "cache": d / "cache.zarr", "proj": d / "proj.npz", "shards": demo_shards["train"]}


def _config(cached, out, **kw) -> TrainStudentConfig:
    base = dict(
        cache=str(cached["cache"]),
        projection=(str(cached["proj"]),),
        student=("resnet18",),
        out=str(out),
        epochs=2,
        batch_size=8,
        workers=0,
        device="cpu",
        quiet=True,
        shuffle_buffer=4,
        lr=0.05,
    )
    base.update(kw)
    return TrainStudentConfig(**base)


def _spec(cached, **kw) -> StreamSpec:
    paths = tuple(s.path for s in list_shards(cached["shards"]))
    base = dict(
        store=str(cached["cache"]), shard_paths=paths, tap="pre_relu", resolution=32, seed=0, shuffle_buffer=0
    )
    base.update(kw)
    return StreamSpec(**base)


def test_a_step_from_the_cache_equals_the_online_teacher_step(cached):
    stream = PairStream(_spec(cached))
    x, rows, _ = next(iter(DataLoader(stream, batch_size=8)))
    proj = load_projection(cached["proj"])
    teacher = rebuild_teacher(open_store(cached["cache"]))
    with torch.inference_mode():
        online = teacher(x)["pre_relu"].float().clone()
    results = []
    for raw in (rows.float(), online.half().float(), online):
        torch.manual_seed(7)
        student = Student("resnet18", "pre_relu", "kdep", 512, 32)
        opt = torch.optim.SGD(student.parameters(), lr=0.0)  # lr 0: compare the gradients, not the update
        ctx = StepContext(torch.device("cpu"), "off", LossSpec("kdep", 3.0))
        loss, _ = train_step(student, opt, x, proj.targets(raw), ctx)
        grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.requires_grad])
        results.append((loss, grads))
    (loss_c, g_c), (loss_h, g_h), (loss_o, g_o) = results
    # The online teacher rounded to float16 like the cache: the same loss and gradients (batch-size noise only).
    assert loss_c == pytest.approx(loss_h, rel=1e-4)
    assert (g_c - g_h).norm() / g_h.norm() < 1e-3
    # In full float32 the only difference is float16 storage, amplified near zero by PTS's cube root.
    assert loss_c == pytest.approx(loss_o, rel=2e-2)
    assert torch.nn.functional.cosine_similarity(g_c, g_o, dim=0) > 0.99


@pytest.mark.parametrize(("world", "workers"), [(2, 2), (1, 2), (3, 1)])
def test_every_scheduled_pair_appears_exactly_once_across_ranks_and_workers(cached, world, workers):
    store = open_store(cached["cache"])
    epoch = 4
    expected = Counter()
    for s in range(len(store.layout.shards)):
        block = store.read_slot(s)
        for row in range(len(block.keys)):
            expected[(s, row, scheduled_view(0, s, epoch, 0, 3, "walk"))] += 1
    seen = Counter()
    for rank in range(world):
        stream = PairStream(_spec(cached, rank=rank, world=world, shuffle_buffer=5))
        stream.set_epoch(epoch)
        for _x, _rows, ids in DataLoader(stream, batch_size=4, num_workers=workers):
            seen.update(tuple(int(v) for v in i) for i in ids)
    assert seen == expected and max(seen.values()) == 1
    # the run's own check of the same fact: the order-free fingerprint of the delivered ids against the schedule's
    ids = np.array([k for k, n in seen.items() for _ in range(n)])
    assert fingerprint(ids) == epoch_fingerprint(store, 0, epoch, (0, 3), "walk")
    assert fingerprint(ids[1:]) != epoch_fingerprint(store, 0, epoch, (0, 3), "walk")  # one missing
    assert fingerprint(np.concatenate([ids, ids[:1]])) != fingerprint(ids)  # one twice


def test_the_view_walk_visits_every_view_once_per_k_epochs():
    for shard in (0, 1, 1281):
        assert sorted(scheduled_view(3, shard, e, 0, 5) for e in range(5)) == list(range(5))
        assert sorted(scheduled_view(3, shard, e, 0, 5) for e in range(5, 10)) == list(range(5))
        assert sorted(scheduled_view(3, shard, e, 1, 5) for e in range(4)) == [1, 2, 3, 4]
        for cycle in range(3):  # a fresh permutation every cycle of n = 2 training views
            assert sorted(scheduled_view(3, shard, e, 1, 3) for e in (2 * cycle, 2 * cycle + 1)) == [1, 2]
        assert {scheduled_view(3, shard, e, 1, 5, "random") for e in range(50)} == {1, 2, 3, 4}
    # different shards walk different orders (a seeded permutation each), so an epoch mixes view indices
    assert len({tuple(scheduled_view(3, s, e, 0, 5) for e in range(5)) for s in range(20)}) > 1


@pytest.mark.parametrize(("world", "workers"), [(2, 2), (3, 1)])
def test_every_image_shows_every_training_view_once_per_cycle(cached, world, workers):
    """Over a cycle of n epochs (n training views), each image is paired with each of its training views exactly
    once, across ranks x workers; within an epoch all images of a shard share one view (one read per shard)."""
    store = open_store(cached["cache"])
    n = store.layout.views
    seen = Counter()
    for epoch in range(n, 2 * n):  # the second cycle
        per_shard_views = {}
        for rank in range(world):
            stream = PairStream(_spec(cached, rank=rank, world=world, shuffle_buffer=5))
            stream.set_epoch(epoch)
            for _x, _rows, ids in DataLoader(stream, batch_size=4, num_workers=workers):
                for shard, row, view in (tuple(int(v) for v in i) for i in ids):
                    seen[(shard, row, view)] += 1
                    per_shard_views.setdefault(shard, set()).add(view)
        assert all(len(v) == 1 for v in per_shard_views.values())
    images = sum(
        int(store.read_slot(s, taps=[], views=[]).valid.sum()) for s in range(len(store.layout.shards))
    )
    assert len(seen) == images * n and set(seen.values()) == {1}


def test_views_used_trains_on_the_first_views_only(cached):
    store = open_store(cached["cache"])
    assert training_views(store, 2) == (0, 2)
    views = set()
    for epoch in range(6):
        stream = PairStream(_spec(cached, views_used=2))
        stream.set_epoch(epoch)
        views |= {int(ids[2]) for _x, _rows, ids in stream}
    assert views == {0, 1}
    with pytest.raises(StoreError, match="views_used 4"):
        training_views(store, 4)


def _rewrite(src: str, dst: Path, edit) -> str:
    samples = [(s.key, dict(s.fields)) for s in iter_samples(src)]
    write_shard(dst, edit(samples))
    return str(dst)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s[1:], "cached image .* is missing from the shard"),
        (lambda s: [*s, ("stranger_1", s[0][1])], "key 'stranger_1' is not in the cache"),
        (lambda s: [(s[0][0], s[1][1]), *s[1:]], "image differs from the cached one"),
    ],
)
def test_the_key_join_detects_missing_extra_and_changed_images(cached, tmp_path, edit, message):
    paths = [s.path for s in list_shards(cached["shards"])]
    paths[0] = _rewrite(paths[0], tmp_path / paths[0].rsplit("/", 1)[1], edit)
    stream = PairStream(_spec(cached, shard_paths=tuple(paths)))
    with pytest.raises(JoinError, match=message):
        list(stream)
    skipping = PairStream(_spec(cached, shard_paths=tuple(paths), skip_bad=True))
    n = sum(1 for _ in skipping)
    assert n <= 24 and skipping.counts["skipped_bad"] >= 1 and skipping.counts["pairs"] == n


def test_changed_source_shards_are_refused_before_training(cached, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(cached["shards"], moved)
    first = sorted(moved.glob("*.tar"))[0]
    _rewrite(str(first), first, lambda s: s[1:])
    (moved / "index.json").unlink()
    with pytest.raises(SourceError, match=r"train-000000\.tar changed since"):
        train_run(_config(cached, tmp_path / "run", shards=str(moved)))


def test_resume_after_a_kill_reproduces_the_uninterrupted_weights(cached, tmp_path, monkeypatch):
    straight = train_run(_config(cached, tmp_path / "straight"))
    import pipeline.student.run as sr

    calls = {"n": 0}
    original = sr.train_step

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # in the second epoch (3 steps per epoch)
            raise KeyboardInterrupt("simulated kill")
        return original(*args, **kwargs)

    monkeypatch.setattr(sr, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_run(_config(cached, tmp_path / "resumed"))
    monkeypatch.setattr(sr, "train_step", original)
    resumed = train_run(_config(cached, tmp_path / "resumed"))
    a = torch.load(straight["students"]["resnet18"]["backbone"])
    b = torch.load(resumed["students"]["resnet18"]["backbone"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "resumed" / "done.json").is_file() and (tmp_path / "resumed" / "loss.png").is_file()


def test_exported_backbone_loads_into_torchvision_strictly(cached, tmp_path):
    result = train_run(_config(cached, tmp_path / "run", epochs=1))
    state = torch.load(result["students"]["resnet18"]["backbone"])
    model = torchvision.models.resnet18()
    del model.fc  # drop the classifier
    model.load_state_dict(state, strict=True)
    records = [
        line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line
    ]
    assert records and np.isfinite(float(__import__("json").loads(records[-1])["loss"]))


def test_two_students_in_one_pass_and_width_and_cache_mismatches(cached, tmp_path):
    fit_run(FitSvdConfig(cache=str(cached["cache"]), out=str(tmp_path / "p1280.npz"), dim=512, quiet=True))
    with pytest.raises(
        ModelError, match="student mobilenet_v2 pre_relu width is 1280 but the projection gives 512"
    ):
        train_run(_config(cached, tmp_path / "a", student=("mobilenet_v2",)))
    other = tmp_path / "other.zarr"
    shutil.copytree(cached["cache"], other)
    import zarr

    g = zarr.open_group(str(other / "store.zarr"), mode="r+")
    meta = g.attrs["kdep"]
    meta["provenance"]["views"]["seed"] = 99
    g.attrs["kdep"] = meta
    with pytest.raises(ProvenanceError, match="projection .* differs: cache_fingerprint"):
        train_run(_config(cached, tmp_path / "b", cache=str(other)))
    res = train_run(
        _config(
            cached,
            tmp_path / "c",
            epochs=1,
            student=("resnet18", "resnet18"),
            projection=(str(cached["proj"]), str(tmp_path / "p1280.npz")),
        )
    )
    assert set(res["students"]) == {"resnet18-0", "resnet18-1"}


def test_online_teacher_mode_trains_from_the_live_teacher(cached, tmp_path):
    """--online-teacher: same stream, same steps, targets from the teacher run live on the replayed views."""
    cached_run = train_run(_config(cached, tmp_path / "cached", epochs=1))
    online_run = train_run(_config(cached, tmp_path / "online", epochs=1, online_teacher=True))
    a, b = cached_run["students"]["resnet18"]["loss"], online_run["students"]["resnet18"]["loss"]
    assert np.isfinite(b) and b == pytest.approx(a, rel=0.05)  # float16 storage is the only difference


def test_an_unfinished_cache_or_a_missing_tap_is_refused(cached, tmp_path):
    partial = tmp_path / "partial.zarr"
    shutil.copytree(cached["cache"], partial)
    (partial / "markers" / "000001.json").unlink()
    with pytest.raises(StoreError, match=r"not complete: 1 shard\(s\) not cached yet, e.g. train-000001.tar"):
        train_run(_config(cached, tmp_path / "a", cache=str(partial)))
    with pytest.raises(StoreError, match="has no tap 'post_relu'"):
        train_run(_config(cached, tmp_path / "b", tap="post_relu", loss="coss", projection=()))


@pytest.mark.parametrize("recipe", ["paper", "center", "kdep-reference", "coss"])
def test_uint8_views_normalised_on_the_device_equal_todays_float_views_bit_for_bit(recipe):
    """Workers send uint8 where exact; ``normalize_views`` (what views_on_device and stage 1's teacher input run)
    reproduces replay_view's normalised float32 exactly, and views with colour ops stay float32."""
    from pipeline.data.views import (
        has_colour_ops,
        normalize_views,
        replay_for_transport,
        replay_view,
        sample_view_params,
        stack_views,
    )
    from pipeline.student.training import views_on_device

    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 57, 71), dtype=np.uint8))
    params = [sample_view_params(recipe, 0, f"k{i}", i, 57, 71) for i in range(12)]
    today = torch.stack([replay_view(image, p, 32) for p in params])
    sent = [replay_for_transport(image, p, 32) for p in params]
    assert all((v.dtype == torch.uint8) == (not has_colour_ops(p)) for v, p in zip(sent, params, strict=True))
    batch = stack_views(sent)
    ctx = StepContext(torch.device("cpu"), "off", LossSpec("kdep", 3.0))
    assert torch.equal(views_on_device(batch, ctx), today)
    assert torch.equal(torch.stack([normalize_views(v) for v in sent]), today)
    if recipe in ("paper", "center"):
        assert batch.dtype == torch.uint8  # 4x less /dev/shm and pinned memory


def test_the_run_loader_sends_uint8_and_persistent_workers_follow_the_epoch(cached):
    from pipeline.student.loaders import LoaderSpec, PairLoaders
    from pipeline.student.training import views_on_device

    store = open_store(cached["cache"])
    ctx = StepContext(torch.device("cpu"), "off", LossSpec("kdep", 3.0))
    loaders = PairLoaders(
        LoaderSpec(_spec(cached, uint8_views=True), 8, 1, False), store
    )  # 1 persistent worker
    for epoch in (0, 1):
        stream = PairStream(_spec(cached))
        stream.set_epoch(epoch)
        reference = list(DataLoader(stream, batch_size=8))
        got = list(loaders.for_epoch(epoch))
        assert len(got) == len(reference) == 3 and got[0][0].dtype == torch.uint8
        for (x, rows, ids), (x_ref, rows_ref, ids_ref) in zip(got, reference, strict=True):
            assert torch.equal(ids, ids_ref) and torch.equal(rows, rows_ref)
            assert torch.equal(views_on_device(x, ctx), x_ref)
    assert loaders.for_epoch(2) is loaders.for_epoch(2)  # one DataLoader for the run


@pytest.mark.parametrize("consumers", [4, 5, 8])
def test_more_consumers_than_shards_stride_in_groups_and_pair_each_view_once(cached, consumers, monkeypatch):
    """Consumers (ranks x workers; here ranks with no worker processes) > shards: each shard is opened by at
    most ceil(consumers / shards) consumers, and every scheduled (image, view) still appears exactly once."""
    import math

    import pipeline.student.pairs as pairs

    store = open_store(cached["cache"])
    shards, epoch = len(store.layout.shards), 3
    opened = Counter()
    original = pairs.iter_samples

    def counting(path, *args, **kwargs):
        opened[path] += 1
        return original(path, *args, **kwargs)

    monkeypatch.setattr(pairs, "iter_samples", counting)
    expected = Counter()
    for s in range(shards):
        for row in range(len(store.read_slot(s).keys)):
            expected[(s, row, scheduled_view(0, s, epoch, 0, 3, "walk"))] += 1
    seen = Counter()
    for rank in range(consumers):
        stream = PairStream(_spec(cached, rank=rank, world=consumers, shuffle_buffer=3))
        stream.set_epoch(epoch)
        seen.update(tuple(int(v) for v in ids) for _x, _rows, ids in stream)
    assert seen == expected and max(seen.values()) == 1
    assert len(opened) == shards and max(opened.values()) <= math.ceil(consumers / shards)
    for workers in (2, 3):  # the plan for 2 ranks x workers: every consumer reads one shard
        plans = [pairs.consumer_plan(list(range(shards)), c, 2 * workers) for c in range(2 * workers)]
        per_shard = Counter(s for shard_list, _m, _g in plans for s in shard_list)
        assert max(per_shard.values()) <= math.ceil(2 * workers / shards)


def test_an_epoch_with_no_batch_is_a_one_line_error_naming_the_numbers(cached, tmp_path):
    from pipeline.student.run import EmptyEpochError

    with pytest.raises(EmptyEpochError, match=r"^epoch 1 yielded no batch: 24 samples over 1 rank\(s\) x 1 "
                       r"worker\(s\) gave 24 batch\(es\) of one .* batch_size 1; [^\n]*$"):  # fmt: skip
        train_run(_config(cached, tmp_path / "run", batch_size=1))


def test_running_out_of_shared_memory_says_to_raise_dev_shm_or_lower_workers():
    from pipeline.student.loaders import LoaderError, LoaderSpec, batches

    def dying():
        yield 1
        raise RuntimeError("unable to write to file </torch_12_345_6>: No space left on device (28)")

    stream = StreamSpec(store="", shard_paths=(), tap="pre_relu", resolution=32, seed=0)
    spec = LoaderSpec(stream, 64, 8, True, prefetch_factor=4)
    with pytest.raises(LoaderError, match=r"raise /dev/shm \(docker run --shm-size.*lower --workers"):
        list(batches(dying(), spec))
    with pytest.raises(RuntimeError, match="something else"):
        list(batches(iter(_raise(RuntimeError("something else"))), spec))


def _raise(err):
    raise err
    yield


def test_workers_auto_is_the_cores_per_local_rank_and_explicit_values_keep_their_meaning(
    monkeypatch, tmp_path
):
    import os

    from pipeline.manifest import ConfigError
    from pipeline.runtime import resolve_workers

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_workers(-1) == max(1, cores - 1) and resolve_workers(0) == 0 and resolve_workers(2) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_workers(-1) == max(1, cores // 2 - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))
    assert resolve_workers(-1) == 1
    assert TrainStudentConfig(cache="c", out="o", projection=("p",), workers=-1).workers == -1
    with pytest.raises(ConfigError, match="workers"):
        TrainStudentConfig(cache="c", out="o", projection=("p",), workers=-2)


def test_checkpoint_every_n_epochs_keeps_the_last_and_resume_stays_exact(cached, tmp_path, monkeypatch):
    import json

    import pipeline.student.run as sr

    straight = train_run(_config(cached, tmp_path / "straight", epochs=3, checkpoint_every=2))
    saved = sorted(p.name for p in (tmp_path / "straight" / "checkpoints").glob("*.pt"))
    assert saved == ["epoch-0001.pt", "epoch-0002.pt"]
    calls, original = {"n": 0}, sr.train_step

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # the last step of epoch 3: epochs 1-2 are checkpointed, epoch 3 is trained again
            raise KeyboardInterrupt("simulated kill")
        return original(*args, **kwargs)

    monkeypatch.setattr(sr, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_run(_config(cached, tmp_path / "resumed", epochs=3, checkpoint_every=2))
    monkeypatch.setattr(sr, "train_step", original)
    resumed = train_run(_config(cached, tmp_path / "resumed", epochs=3, checkpoint_every=2))
    a = torch.load(straight["students"]["resnet18"]["backbone"])
    b = torch.load(resumed["students"]["resnet18"]["backbone"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1, 2]  # no duplicate of the re-run


def test_leftover_shards_spread_over_the_ranks_not_onto_the_lowest():
    """1282 shards over 64 ranks x 16 workers: 258 consumers get a second shard; with interleaved consumer numbers
    every rank's share is within 5% of the mean (rank-major numbering gave the lowest ranks 1.6x)."""
    shards, ranks, workers = 1282, 64, 16
    order = list(range(shards))

    def per_rank(number) -> list[int]:
        return [sum(len(consumer_plan(order, number(r, w), ranks * workers)[0]) for w in range(workers))
                for r in range(ranks)]  # fmt: skip

    mean = shards / ranks
    shares = per_rank(lambda r, w: consumer_id(r, ranks, w))
    assert sum(shares) == shards and max(shares) <= 1.05 * mean and min(shares) >= 0.95 * mean
    assert max(per_rank(lambda r, w: r * workers + w)) / mean > 1.5  # the old numbering
    assert [consumer_id(0, 1, w) for w in range(4)] == [0, 1, 2, 3]  # one rank: the worker number, as before


def test_a_global_batch_is_shared_by_the_ranks_or_refused_in_one_line(cached, tmp_path):
    from pipeline.errors import KdepError
    from pipeline.runtime import Dist
    from pipeline.student.setup import per_rank_batch, run_record
    from stages.train_student import train_spec

    spec = train_spec(_config(cached, tmp_path / "r", global_batch_size=512, batch_size=7))[0]
    eight = per_rank_batch(spec, Dist(0, 8))
    assert eight.recipe.batch_size == 64 and eight.batch_per_rank == 64
    assert run_record(eight, Dist(0, 8), "off", False)["global_batch"] == 512
    assert per_rank_batch(spec, Dist(0, 1)).batch_per_rank == 512
    with pytest.raises(KdepError, match="global_batch_size 512 does not split over 3 rank"):
        per_rank_batch(spec, Dist(0, 3))
    assert (
        per_rank_batch(train_spec(_config(cached, tmp_path / "r"))[0], Dist(0, 8)).batch_per_rank == 8
    )  # per rank
    coss = train_spec(_config(cached, tmp_path / "c", loss="coss", projection=(), tap="post_relu",
                              student_tap="post_relu", neighbours=15, anchors=16, global_batch_size=1024))[0]  # fmt: skip
    four = per_rank_batch(coss, Dist(0, 4))  # CoSS's reference: 4 GPUs x 16 anchors x (1 + 15)
    assert four.data.anchors == 16 and four.batch_per_rank == 256
    assert per_rank_batch(coss, Dist(0, 8)).data.anchors == 8
    with pytest.raises(KdepError, match="x 16 images per anchor group"):
        per_rank_batch(coss, Dist(0, 3))


def test_parameters_no_target_reaches_are_frozen_and_recorded(cached, tmp_path):
    """A student distilling stage 3 only never uses layer4: its parameters are frozen (else DDP fails at the second
    step on 2 ranks) and listed in provenance.json; with the pre_relu target nothing but the classifier is."""
    from pipeline.student.training import Student, freeze_unreached, unreached_parameters

    student = Student("resnet18", ("stage3",), "kdep", (256,), 32)
    names = unreached_parameters(student, 32, torch.device("cpu"))
    assert names and all(n.startswith("backbone.layer4.") for n in names)
    assert {n for n, p in student.named_parameters() if n.startswith("backbone.layer4.")} == set(names)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    assert freeze_unreached(student, 32, torch.device("cpu")) == tuple(names)
    assert not any(p.requires_grad for n, p in student.named_parameters() if n in names)
    assert all(
        torch.equal(before[k], v) for k, v in student.state_dict().items()
    )  # the probe changed nothing
    assert student.training  # and left the mode as it was
    assert (
        unreached_parameters(Student("resnet18", ("pre_relu",), "kdep", (512,), 32), 32, torch.device("cpu"))
        == []
    )
    train_run(_config(cached, tmp_path / "run", epochs=1))
    prov = __import__("json").loads((tmp_path / "run" / "provenance.json").read_text())
    assert prov["frozen_parameters"] == {"resnet18": []}
    assert prov["run"] == {
        "world_size": 1,
        "batch_per_rank": 8,
        "global_batch": 8,
        "amp": "off",
        "tf32": False,
        "views": "cached",
    }


def test_a_diverging_student_stops_the_run_naming_it(cached, tmp_path):
    from pipeline.student.run import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"student resnet18: the loss is (nan|inf) at epoch \d+, step \d+: "
                       r"training diverged; lower --lr \(now 1e\+06\)"):  # fmt: skip
        train_run(_config(cached, tmp_path / "run", lr=1e6, log_every=1))
