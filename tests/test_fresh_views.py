"""True online KD (`train-student --online-teacher --fresh-views`) against references: every (image, epoch) gets a
view drawn like the cached ones (the cache's recipe and seed) at an index outside the pool, so no fresh view equals a
cached one; the streamed view is the replay of those parameters, and the live teacher's target equals the teacher
run on that replayed view; a whole run delivers each image once per epoch, on a new view every epoch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import DataLoader

from pipeline.cache.join import rebuild_teacher
from pipeline.cache.store import open_store
from pipeline.data.images import decode_rgb, image_bytes
from pipeline.data.shards import iter_samples, list_shards
from pipeline.data.views import replay_view, sample_view_params
from pipeline.manifest import ConfigError
from pipeline.student.loaders import collate_pairs
from pipeline.student.online import build_online_teacher
from pipeline.student.pairs import FRESH_VIEWS_FROM, PairStream, StreamSpec, fresh_view
from pipeline.student.specs import LossSpec
from pipeline.student.training import StepContext, teacher_rows, views_on_device
from stages.cache_teacher import CacheTeacherConfig
from stages.cache_teacher import run as cache_run
from stages.fit_svd import FitSvdConfig
from stages.fit_svd import run as fit_run
from stages.train_student import TrainStudentConfig
from stages.train_student import run as train_run


@pytest.fixture(scope="module")
def cached(demo_shards, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("fresh")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), d / "teacher.pt")
    cache_run(CacheTeacherConfig(shards=str(demo_shards["train"]), out=str(d / "cache"), teacher="resnet18",
                                 weights=str(d / "teacher.pt"), views=3, resolution=32, batch_size=6, workers=0,
                                 device="cpu", quiet=True, dtype="float32"))  # fmt: skip
    fit_run(FitSvdConfig(cache=str(d / "cache"), out=str(d / "proj.npz"), dim=512, quiet=True))
    return {"dir": d, "cache": d / "cache", "proj": d / "proj.npz", "shards": demo_shards["train"]}


def _stream(cached, epoch: int, **kw) -> PairStream:
    paths = tuple(s.path for s in list_shards(cached["shards"]))
    spec = StreamSpec(store=str(cached["cache"]), shard_paths=paths, tap="pre_relu", resolution=32, seed=0,
                      shuffle_buffer=0, fresh_views=True, **kw)  # fmt: skip
    stream = PairStream(spec)
    stream.set_epoch(epoch)
    return stream


def test_no_fresh_view_equals_a_cached_one_and_each_epoch_draws_anew(cached):
    store = open_store(cached["cache"])
    provenance = store.provenance["views"]
    for shard in range(len(store.layout.shards)):
        block = store.read_slot(shard)
        for row, key in enumerate(block.keys):
            h, w = (int(v) for v in block.hw[row])
            fresh = [sample_view_params(provenance["recipe"], provenance["seed"], key, fresh_view(e), h, w)
                     for e in range(4)]  # fmt: skip
            assert all(fresh_view(e) >= FRESH_VIEWS_FROM > store.layout.views for e in range(4))
            for a in fresh:
                assert not any(np.array_equal(a, block.params[row, v]) for v in range(store.layout.views))
            assert len({tuple(a[:4]) for a in fresh}) == 4  # four epochs, four crops


def test_the_stream_replays_the_fresh_view_and_the_target_is_the_teacher_on_it(cached):
    store = open_store(cached["cache"])
    views, rows, ids = next(
        iter(DataLoader(_stream(cached, epoch=2), batch_size=8, collate_fn=collate_pairs))
    )
    assert rows.shape == (8, 0) and (ids[:, 2] == fresh_view(2)).all()  # no cached row is read
    recipe, seed = store.provenance["views"]["recipe"], store.provenance["views"]["seed"]
    paths = [s.path for s in list_shards(cached["shards"])]
    samples = {(i, s.key): s for i, p in enumerate(paths) for s in iter_samples(p)}
    expected = []
    for shard, row, view in ids.tolist():
        key = store.keys_at([shard * store.layout.slot_rows + row])[0]
        image = decode_rgb(image_bytes(samples[(shard, key)], key), key)
        params = sample_view_params(recipe, seed, key, view, *image.shape[1:])
        expected.append(replay_view(image, params, 32))
    expected = torch.stack(expected)
    cpu = torch.device("cpu")
    ctx = StepContext(cpu, "off", LossSpec("kdep"), teacher=build_online_teacher(store, ("pre_relu",), cpu))
    x = views_on_device(views, ctx)
    assert torch.equal(x, expected)
    with torch.no_grad():
        reference = rebuild_teacher(store, ("pre_relu",))(expected)["pre_relu"]
    torch.testing.assert_close(teacher_rows(rows, x, ctx)["pre_relu"], reference, rtol=0, atol=0)


def test_an_online_run_on_fresh_views_sees_every_image_once_per_epoch(cached, tmp_path):
    config = TrainStudentConfig(cache=str(cached["cache"]), projection=(str(cached["proj"]),), student=("resnet18",),
                                out=str(tmp_path / "run"), epochs=2, batch_size=8, workers=1, device="cpu",
                                quiet=True, lr=0.05, online_teacher=True, fresh_views=True)  # fmt: skip
    result = train_run(config)
    assert np.isfinite(result["students"]["resnet18"]["loss"])
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["coverage"] for r in epochs] == ["exact", "exact"] and all(r["images"] == 24 for r in epochs)
    assert json.loads((tmp_path / "run" / "provenance.json").read_text())["run"]["views"] == "fresh"


@pytest.mark.parametrize(("kw", "message"), [
    (dict(fresh_views=True), "add --online-teacher"),
    (dict(fresh_views=True, online_teacher=True, views_used=2), "not with views_used"),
    (dict(fresh_views=True, online_teacher=True, loss="coss", projection=(), neighbours=2), "not with neighbours"),
])  # fmt: skip
def test_fresh_views_need_the_online_teacher_and_the_stream(kw, message):
    base = dict(cache="c", out="o", projection=("p",))
    with pytest.raises(ConfigError, match=message):
        TrainStudentConfig(**{**base, **kw})
