"""Several teachers in one cache: one pass (each image decoded once, each view replayed once per distinct
resolution) equals one single-teacher cache per teacher, feature for feature; the cache verifies, rebuilds, fits
and trains per teacher tap; bad teacher lists are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cache.join import TeacherEnsemble, rebuild_teacher
from pipeline.cache.store import open_store
from pipeline.cache.verify import verify_store
from pipeline.manifest import ConfigError
from pipeline.teachers import teacher_records
from stages.cache_teacher import CacheTeacherConfig
from stages.cache_teacher import run as cache_run
from stages.fit_svd import FitSvdConfig
from stages.fit_svd import run as fit_run

timm = pytest.importorskip("timm")

COMMON = dict(views=2, batch_size=8, workers=0, device="cpu", quiet=True, dtype="float32")


@pytest.fixture(scope="module")
def caches(demo_shards, tmp_path_factory):
    """A ResNet-18 (32 px) and a tiny ViT (48 px, mean/std 0.5) cached together, and each alone."""
    d = tmp_path_factory.mktemp("two")
    torch.manual_seed(0)
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), d / "r18.pt")
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=48).state_dict(), d / "vit.pt")
    shards = str(demo_shards["train"])
    cache_run(CacheTeacherConfig(shards=shards, out=str(d / "both"), teacher=("cnn=resnet18", "vit=timm:vit_tiny_patch16_224"),
                                 weights=(str(d / "r18.pt"), str(d / "vit.pt")), teacher_resolution=(32, 48),
                                 taps=("cnn/pre_relu", "stage2", "vit/pooled"), **COMMON))  # fmt: skip
    cache_run(CacheTeacherConfig(shards=shards, out=str(d / "cnn"), teacher="resnet18", weights=str(d / "r18.pt"),
                                 resolution=32, taps=("pre_relu", "stage2"), **COMMON))  # fmt: skip
    cache_run(CacheTeacherConfig(shards=shards, out=str(d / "vit"), teacher="timm:vit_tiny_patch16_224",
                                 weights=str(d / "vit.pt"), resolution=48, taps=("pooled", "stage2"), **COMMON))  # fmt: skip
    return d


def test_a_two_teacher_cache_equals_two_single_teacher_caches(caches):
    both, cnn, vit = (open_store(caches / n) for n in ("both", "cnn", "vit"))
    assert both.layout.dims == {"cnn/pre_relu": 512, "cnn/stage2": 128, "vit/stage2": 192, "vit/pooled": 192}
    for shard in range(len(both.layout.shards)):
        b, c, v = both.read_slot(shard), cnn.read_slot(shard), vit.read_slot(shard)
        assert b.keys == c.keys == v.keys
        np.testing.assert_array_equal(b.params, c.params)
        for name, single, tap in [("cnn/pre_relu", c, "pre_relu"), ("cnn/stage2", c, "stage2"),
                                  ("vit/pooled", v, "pooled"), ("vit/stage2", v, "stage2")]:  # fmt: skip
            np.testing.assert_array_equal(b.features[name], single.features[tap], err_msg=name)


def test_the_provenance_records_each_teacher_with_its_label_resolution_and_normalisation(caches):
    prov = open_store(caches / "both").provenance
    assert "teacher" not in prov and [t["label"] for t in prov["teachers"]] == ["cnn", "vit"]
    records = {r["label"]: r for r in teacher_records(prov)}
    assert records["cnn"]["resolution"] == 32 and records["vit"]["resolution"] == 48
    assert records["vit"]["normalization"]["mean"] == [0.5, 0.5, 0.5]
    assert records["vit"]["cache_taps"] == ["vit/stage2", "vit/pooled"]  # in --taps order
    assert prov["preprocessing"]["resolution"] == 32  # the first teacher's: the students' default
    assert set(prov["recorded"]["weights_paths"]) == {"cnn", "vit"}
    single = open_store(caches / "cnn").provenance
    assert "teachers" not in single and single["teacher"]["taps"] == ["pre_relu", "stage2"]


def test_a_two_teacher_cache_verifies_and_rebuilds_each_teacher(caches):
    store = open_store(caches / "both")
    report = verify_store(store, samples=4, seed=2)
    assert report.ok and report.max_rel_error < 1e-5, report
    ensemble = rebuild_teacher(store, ("vit/pooled", "cnn/stage2"))
    assert isinstance(ensemble, TeacherEnsemble)
    out = ensemble(torch.zeros(2, 3, 48, 48))
    assert set(out) == {"vit/pooled", "cnn/stage2"} and out["vit/pooled"].shape == (2, 192)
    with pytest.raises(Exception, match="has no tap 'vit/pre_relu'"):
        rebuild_teacher(store, ("vit/pre_relu",))


def test_fit_svd_fits_one_teachers_tap(caches, tmp_path):
    fit_run(FitSvdConfig(cache=str(caches / "both"), out=str(tmp_path / "p.npz"), tap="vit/pooled", dim=64,
                         quiet=True))  # fmt: skip
    from pipeline.projection.artefact import load_projection

    proj = load_projection(tmp_path / "p.npz")
    assert proj.meta["tap"] == "vit/pooled" and proj.dim_student == 64


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(teacher=("resnet18", "resnet18"), weights=("random", "random")), "names two teachers"),
        (dict(teacher=("a=resnet18", "b=resnet50"), weights=("random",)), "1 given for 2 teacher"),
        (
            dict(teacher=("a=resnet18", "b=resnet50"), weights=("random", "random"), taps=("c/pooled",)),
            "names no teacher",
        ),
        (
            dict(teacher=("a=resnet18", "b=resnet50"), weights=("random", "random"), taps=("a/pooled",)),
            "no tap for teacher 'b'",
        ),
        (
            dict(
                teacher=("a=resnet18", "b=resnet50"), weights=("random", "random"), teacher_resolution=(32,)
            ),
            "1 given for 2",
        ),
        (
            dict(teacher=("a=resnet18", "b=resnet50"), weights=("random", "random"), mean=(0.5, 0.5, 0.5)),
            "one teacher's normalisation",
        ),
        (dict(teacher=("a b=resnet18",), weights=("random",)), "must be letters"),
        (dict(teacher=("resnet18",), weights=("random",), taps=("x/y",)), "is not a cache tap"),
    ],
)
def test_bad_teacher_lists_are_refused_by_key(kw, message):
    with pytest.raises(ConfigError, match=message):
        CacheTeacherConfig(shards="s", out="o", **kw)


def test_inspect_names_each_teacher(caches):
    from stages.inspect_cache import summarize

    info = summarize(open_store(caches / "both"))
    assert info["teacher"] == "cnn=resnet18, vit=timm:vit_tiny_patch16_224"
    assert info["resolution"] == "cnn=32, vit=48" and "vit/pooled" in info["taps"]


def test_each_teachers_arrays_open_in_another_zarr_reader(caches):
    ts = pytest.importorskip("tensorstore")
    import zarr

    group = zarr.open_group(str(caches / "both" / "store.zarr"), mode="r")
    for name in ("features/cnn/pre_relu", "features/vit/pooled"):
        spec = {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(caches / "both" / "store.zarr" / name)},
        }
        np.testing.assert_array_equal(ts.open(spec, read=True).result().read().result(), group[name][...])


@pytest.mark.parametrize("student_side", [32, 40])
def test_the_online_teacher_feeds_each_teacher_its_own_side_and_equals_the_cache(caches, student_side):
    """--online-teacher on a two-teacher cache: the stream replays each view at the student's side and at each
    teacher's own (ResNet-18 at 32 px, ViT-Ti at 48 px), each teacher reads its own side with its own mean/std,
    and the live targets equal the cached rows (float32 cache: to float32 rounding), whatever the student's side."""
    from dataclasses import replace

    from torch.utils.data import DataLoader

    from pipeline.data.shards import list_shards
    from pipeline.student.loaders import collate_pairs
    from pipeline.student.online import build_online_teacher, extra_sides
    from pipeline.student.pairs import PairStream, StreamSpec
    from pipeline.student.specs import LossSpec, TargetSpec
    from pipeline.student.training import StepContext, teacher_rows, views_on_device

    store = open_store(caches / "both")
    taps = ("cnn/pre_relu", "vit/pooled")
    sides = extra_sides(store, taps, student_side)
    assert sides == ((48,) if student_side == 32 else (32, 48))
    paths = tuple(s.path for s in list_shards(store.provenance["recorded"]["source"]))
    spec = StreamSpec(store=str(caches / "both"), shard_paths=paths, tap=taps[0], taps=taps, resolution=student_side,
                      seed=0, shuffle_buffer=0, uint8_views=True, extra_resolutions=sides)  # fmt: skip
    views, rows, _ids = next(iter(DataLoader(PairStream(spec), batch_size=8, collate_fn=collate_pairs)))
    assert [v.shape[-1] for v in views] == [student_side, *sides]
    targets = (TargetSpec("pre_relu", "cnn/pre_relu"), TargetSpec("stage2", "vit/pooled"))
    cpu = torch.device("cpu")
    cached = StepContext(cpu, "off", LossSpec("kdep"), tap=taps[0], targets=targets, widths=(512, 192))
    live = replace(cached, teacher=build_online_teacher(store, taps, cpu))
    x = views_on_device(views, cached)
    a, b = teacher_rows(rows, x, cached), teacher_rows(rows, x, live)
    for tap in taps:
        torch.testing.assert_close(b[tap], a[tap], rtol=1e-5, atol=1e-5 * a[tap].abs().max().item())
