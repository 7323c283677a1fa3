"""timm models through the stages: a timm teacher with its own normalisation and input size is cached, verified
and rebuilt exactly; a timm student trains from a cache and exports a backbone timm loads strictly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.cache.join import rebuild_teacher
from pipeline.cache.store import open_store
from pipeline.cache.verify import verify_store
from pipeline.data.images import decode_rgb, image_bytes
from pipeline.data.shards import iter_samples, list_shards
from pipeline.data.views import replay_view
from pipeline.models import FeatureTaps, Preprocessing
from stages.cache_teacher import CacheTeacherConfig
from stages.cache_teacher import run as cache_run
from stages.fit_svd import FitSvdConfig
from stages.fit_svd import run as fit_run
from stages.train_student import TrainStudentConfig
from stages.train_student import run as train_run

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def vit_cache(demo_shards, tmp_path_factory):
    """A tiny ViT teacher (mean/std 0.5, built for 32 px) cached from a local weights file."""
    d = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    torch.save(model.state_dict(), d / "vit.pt")
    config = CacheTeacherConfig(shards=str(demo_shards["train"]), out=str(d / "cache"), teacher="timm:vit_tiny_patch16_224",
                                weights=str(d / "vit.pt"), taps=("pooled", "stage2"), views=2, resolution=32,
                                batch_size=8, workers=0, device="cpu", quiet=True, dtype="float32")  # fmt: skip
    cache_run(config)
    return {"dir": d, "cache": d / "cache", "model": model.eval(), "shards": demo_shards["train"]}


def test_a_timm_teacher_is_cached_with_its_own_normalisation_and_size(vit_cache):
    store = open_store(vit_cache["cache"])
    teacher = store.provenance["teacher"]
    assert teacher["arch"] == "timm:vit_tiny_patch16_224" and teacher["weights"]["model_kwargs"] == {
        "img_size": 32
    }
    norm = Preprocessing.from_dict(teacher["normalization"])
    assert norm.mean == (0.5, 0.5, 0.5) and norm.std == (0.5, 0.5, 0.5) and norm.resolution == 32
    assert set(teacher["tap_definitions"]) == {"pooled", "stage2"} and store.layout.dims == {
        "pooled": 192,
        "stage2": 192,
    }
    # cached == the model run on the replayed [0, 1] view normalised with its own mean/std (float32 rounding apart)
    direct = FeatureTaps(vit_cache["model"], ("pooled", "stage2"), preprocessing=norm)
    info = list_shards(vit_cache["shards"])[0]
    block = store.read_slot(0)
    for sample in list(iter_samples(info.path))[:4]:
        row = block.keys.index(sample.key)
        image = decode_rgb(image_bytes(sample, info.path))
        x = replay_view(image, block.params[row, 1], 32, normalize=False)[None]
        with torch.inference_mode():
            out = direct(x)
        for tap in ("pooled", "stage2"):
            np.testing.assert_allclose(block.features[tap][row, 1], out[tap][0].numpy(), rtol=1e-4, atol=1e-5)


def test_a_timm_teacher_cache_verifies_and_rebuilds_exactly(vit_cache):
    store = open_store(vit_cache["cache"])
    report = verify_store(store, samples=6, seed=1)
    assert report.ok and report.max_rel_error < 1e-5, report
    rebuilt = rebuild_teacher(store)
    assert rebuilt.preprocessing.mean == (0.5, 0.5, 0.5)


def test_a_timm_student_trains_from_a_cache_and_exports_a_strict_timm_backbone(vit_cache, tmp_path):
    fit_run(FitSvdConfig(cache=str(vit_cache["cache"]), out=str(tmp_path / "p.npz"), tap="pooled", dim=80,
                         quiet=True))  # fmt: skip
    result = train_run(TrainStudentConfig(cache=str(vit_cache["cache"]), projection=(str(tmp_path / "p.npz"),),
                                          student=("timm:convnext_atto",), tap="pooled", student_tap="stage2",
                                          out=str(tmp_path / "run"), epochs=1, batch_size=8, workers=0,
                                          device="cpu", quiet=True, lr=0.01))  # fmt: skip
    student = result["students"]["timm:convnext_atto"]
    assert np.isfinite(student["loss"])
    state = torch.load(student["backbone"])
    timm.create_model("convnext_atto", pretrained=False, num_classes=0).load_state_dict(state, strict=True)
    done = json.loads((tmp_path / "run" / "done.json").read_text())
    assert (
        "timm.create_model('convnext_atto', pretrained=False, num_classes=0)"
        in done["students"]["timm:convnext_atto"]["load"]
    )
