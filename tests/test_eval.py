"""`kdep eval`: probe / k-NN / CKA / cosine maths against known answers, backbone loading, and the stage end to end.

- Linear probe and k-NN on synthetic features: a fixed random projection of one-hot class codes (+ tiny noise)
  must give 100% top-1; noise independent of the label must give chance level (within a binomial margin).
- k-NN voting rule and linear CKA / mean cosine against hand-computed values; CKA's invariances.
- The 95% Wilson interval against hand-computed values and scipy's ``binomtest(...).proportion_ci("wilson")``;
  every accuracy in results.json, the printed table and the plot carries its interval.
- A backbone saved without its classifier loads with strict=True and equals the source weights.
- ``run(config)`` on tiny demo shards (4 classes x 6 train / 3 val, 32 px, random ResNet-18): results.json keys,
  accuracies in [0, 1], the feature cache (float16 .npy of the evaluated tap only) reused, fine-tuning for 1 epoch.
- Features and fine-tuning read through DataLoader workers equal, bit for bit, the in-process run and a direct
  decode + replay + forward (in memory and in float16 feature files); the feature-file key changes with device
  type and autocast, and a CPU key is the one computed before those were keyed (so existing CPU caches are reused).
  (tests/test_eval_scale.py: the torch probe against scikit-learn, blocked k-NN, feature files, shard reading.)
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from pipeline.evaluation.backbones import BackboneSpec, EvalError, parse_backbone
from pipeline.evaluation.features import extract_features, load_backbone
from pipeline.evaluation.intervals import accuracy_interval, format_with_interval, wilson_interval
from pipeline.evaluation.probes import (
    agreement,
    knn_predict,
    knn_top1,
    linear_cka,
    linear_probe,
    mean_cosine,
    split_holdout,
)
from pipeline.manifest import ConfigError
from pipeline.models import backbone_state_dict
from stages.evaluate import EvalConfig, print_table, run


def class_coded(n_per_class: int, classes: int, dim: int, noise: float, seed: int):
    """Features = one-hot(label) @ fixed random (classes, dim) projection + noise; labels in class order."""
    rng = np.random.default_rng(seed)
    codes = rng.normal(size=(classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    return (codes[y] + noise * rng.normal(size=(len(y), dim))).astype(np.float32), y


def test_probe_and_knn_are_perfect_on_class_coded_features() -> None:
    x_train, y_train = class_coded(30, 5, 64, 0.01, seed=0)
    x_val, y_val = class_coded(10, 5, 64, 0.01, seed=0)  # same codes (same seed), fresh rows
    x_val = x_val + np.random.default_rng(1).normal(0, 0.01, x_val.shape).astype(np.float32)
    probe = linear_probe(x_train, y_train, x_val, y_val, seed=0)
    assert probe.top1 == 1.0
    assert probe.c in (0.01, 0.1, 1.0, 10.0) and set(probe.sweep) == {"0.01", "0.1", "1.0", "10.0"}
    assert knn_top1(x_train, y_train, x_val, y_val, k=20) == 1.0


def test_probe_and_knn_are_at_chance_on_label_free_features() -> None:
    classes, rng = 4, np.random.default_rng(2)
    x_train, x_val = rng.normal(size=(400, 32)), rng.normal(size=(2000, 32))
    y_train, y_val = rng.integers(0, classes, 400), rng.integers(0, classes, 2000)
    margin = 4 * math.sqrt(0.25 * 0.75 / 2000)  # 4 binomial standard deviations around chance
    probe = linear_probe(x_train, y_train, x_val, y_val, cs=(0.1,))
    assert abs(probe.top1 - 1 / classes) < margin and probe.sweep == {}
    assert abs(knn_top1(x_train, y_train, x_val, y_val, k=20) - 1 / classes) < margin


def test_knn_majority_vote_and_similarity_tie_break() -> None:
    bank = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1], [-1, 0]], np.float32)
    labels = np.array([0, 0, 1, 1, 2])
    # k=3 from (1, 0.2): two class-0 neighbours and one class-1 neighbour -> class 0 by majority.
    assert knn_predict(bank, labels, np.array([[1, 0.2]], np.float32), k=3).tolist() == [0]
    # k=4 from (1, 0.9): two votes each for 0 and 1; summed cosines 0: 0.7433 + 0.8062 = 1.5495 and
    # 1: 0.6690 + 0.7396 = 1.4086 -> 0. Mirrored, (0.9, 1) -> 1.
    assert knn_predict(bank, labels, np.array([[1, 0.9]], np.float32), k=4).tolist() == [0]
    assert knn_predict(bank, labels, np.array([[0.9, 1]], np.float32), k=4).tolist() == [1]
    # k larger than the bank is clipped.
    assert knn_predict(bank, labels, np.array([[-1, 0]], np.float32), k=50).shape == (1,)


def test_split_holdout_is_stratified_and_seeded() -> None:
    y = np.repeat(np.arange(3), 10)
    fit, hold = split_holdout(y, 0.2, seed=5)
    assert np.bincount(y[hold]).tolist() == [2, 2, 2]
    assert sorted(np.concatenate([fit, hold]).tolist()) == list(range(30))
    assert np.array_equal(hold, split_holdout(y, 0.2, seed=5)[1])


def test_cka_identity_invariances_and_hand_value() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-12)  # orthogonal transform
    y = rng.normal(size=(50, 5))
    assert linear_cka(x, 3.7 * y) == pytest.approx(linear_cka(x, y), abs=1e-12)  # isotropic scaling
    assert linear_cka(x @ q + 5.0, y) == pytest.approx(linear_cka(x, y), abs=1e-12)  # and translation
    # 1-D: CKA = squared Pearson correlation. x=(1,2,3), y=(1,3,2): centred (-1,0,1), (-1,1,0); 1^2/(2*2).
    assert linear_cka([[1.0], [2.0], [3.0]], [[1.0], [3.0], [2.0]]) == pytest.approx(0.25, abs=1e-12)
    assert 0.0 <= linear_cka(x, y) <= 1.0


def test_mean_cosine_and_agreement_hand_values() -> None:
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    expected = (1.0 + 1 / math.sqrt(2)) / 2  # cos 0 deg and cos 45 deg
    assert mean_cosine(s, t) == pytest.approx(expected, abs=1e-12)
    out = agreement(s, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 7.0]]), t)
    assert out["cosine"] == pytest.approx(expected) and 0.0 <= out["cka"] <= 1.0 + 1e-12
    assert agreement(s, s, None)["cosine"] is None
    with pytest.raises(ValueError, match="projection"):
        mean_cosine(s, torch.zeros(2, 3))


def test_backbone_without_classifier_loads_strictly(tmp_path: Path) -> None:
    torch.manual_seed(7)
    source = torchvision.models.resnet18()
    path = tmp_path / "backbone.pt"
    torch.save(backbone_state_dict(source), path)
    state = torch.load(path, weights_only=True)
    assert not any(k.startswith("fc.") for k in state)
    plain = torchvision.models.resnet18()
    plain.fc = torch.nn.Identity()
    plain.load_state_dict(state, strict=True)  # the file's contract
    model, identity = load_backbone(BackboneSpec("kdep", "resnet18", str(path)), seed=0)
    assert identity["kind"] == "file" and len(identity["sha256"]) == 64
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert "fc.weight" in loaded  # the model stays complete (random head, unused by the taps)


def test_full_checkpoint_and_wrong_arch(tmp_path: Path) -> None:
    path = tmp_path / "full.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    _, identity = load_backbone(BackboneSpec("t", "resnet18", str(path)), seed=0)
    assert identity["kind"] == "file"
    with pytest.raises(Exception, match="does not fit resnet34"):
        load_backbone(BackboneSpec("t", "resnet34", str(path)), seed=0)


def test_parse_backbone_and_config_errors() -> None:
    assert parse_backbone("kdep=resnet18:out/a:b.pt") == BackboneSpec("kdep", "resnet18", "out/a:b.pt")
    with pytest.raises(EvalError, match="name=arch:weights"):
        parse_backbone("resnet18:random")
    with pytest.raises(ConfigError, match="used twice"):
        EvalConfig(backbones=("a=resnet18:random", "a=resnet18:random"))
    with pytest.raises(ConfigError, match="backbones"):
        EvalConfig()
    with pytest.raises(ConfigError, match="teacher"):
        EvalConfig(backbones=("a=resnet18:random",), projection="p.npz")


def test_extract_features_same_rows_for_every_model(demo_shards: dict[str, Path]) -> None:
    a, _ = load_backbone(BackboneSpec("a", "resnet18", "random"), seed=0)
    b, _ = load_backbone(BackboneSpec("b", "resnet18", "random"), seed=1)
    feats = extract_features({"a": a, "b": b}, str(demo_shards["val"]), resolution=32, batch_size=5)
    assert feats["a"].keys == feats["b"].keys and len(feats["a"].keys) == 12
    assert feats["a"].taps["post_relu"].shape == (12, 512) and feats["a"].taps["pre_relu"].min() < 0
    assert np.bincount(feats["a"].labels).tolist() == [3, 3, 3, 3]
    assert not np.allclose(feats["a"].taps["post_relu"], feats["b"].taps["post_relu"])  # seeds differ


def tiny_config(shards: dict[str, Path], out: Path, **kw) -> EvalConfig:
    values = dict(
        train=str(shards["train"]),
        val=str(shards["val"]),
        out=str(out),
        backbones=("random=resnet18:random",),
        resolution=32,
        batch_size=8,
        probe_cs=(0.1, 1.0),
        knn_k=5,
    )
    return EvalConfig(**{**values, **kw})


def test_wilson_interval_against_hand_values_and_scipy() -> None:
    """8 of 10: p = 0.8, z^2 = 3.8415, centre = (0.8 + 0.19207) / 1.38415 = 0.71674, half = 1.41600 x
    sqrt(0.016 + 0.0096037) = 0.22658 -> [0.4902, 0.9433]; 0 of 10 -> [0, z^2 / (10 + z^2)] = [0, 0.2775]."""
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-4) and high == pytest.approx(0.94332, abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-4)
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(152, 200), (1, 3), (499, 1000), (7, 7)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert (
        accuracy_interval(0.76, 200) == list(wilson_interval(152, 200)) and accuracy_interval(None, 5) is None
    )
    assert format_with_interval(0.8, [0.49016, 0.94332]) == "0.800 [0.490, 0.943]"
    with pytest.raises(ValueError, match="correct=3, total=2"):
        wilson_interval(3, 2)


def test_run_end_to_end_and_feature_cache(demo_shards: dict[str, Path], tmp_path: Path, capsys) -> None:
    config = tiny_config(demo_shards, tmp_path)
    results = run(config)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert {"format", "data", "backbones", "agreement", "config"} <= set(on_disk)
    assert on_disk["data"]["train_samples"] == 24 and on_disk["data"]["classes"] == 4
    (row,) = on_disk["backbones"]
    assert {"name", "arch", "identity", "dim", "probe_top1", "probe_c", "knn_top1", "finetune_top1"} <= set(
        row
    )
    assert 0.0 <= row["probe_top1"] <= 1.0 and 0.0 <= row["knn_top1"] <= 1.0 and row["dim"] == 512
    assert row["finetune_top1"] is None and row["agree_cka"] is None
    n_val = on_disk["data"]["val_samples"]
    assert on_disk["intervals"]["method"] == "wilson" and on_disk["intervals"]["level"] == 0.95
    for metric in ("probe_top1", "knn_top1"):
        low, high = row[f"{metric}_ci95"]
        assert low <= row[metric] <= high
        assert [low, high] == list(wilson_interval(round(row[metric] * n_val), n_val))
    assert row["finetune_top1_ci95"] is None
    assert set(row["probe_sweep_ci95"]) == set(row["probe_sweep"]) and row["probe_sweep_rows"] > 0
    for c, (low, high) in row["probe_sweep_ci95"].items():
        assert low <= row["probe_sweep"][c] <= high
    print_table(results)
    assert format_with_interval(row["probe_top1"], row["probe_top1_ci95"]) in capsys.readouterr().out
    assert (tmp_path / "results.png").stat().st_size > 0 and (tmp_path / "config.eval.json").is_file()
    cached = sorted((tmp_path / "features").iterdir())
    assert len(cached) == 2 and cached[0].name.startswith("random.train.")
    for folder in cached:  # the evaluated tap only, float16, with its labels and keys
        assert sorted(p.name for p in folder.iterdir()) == ["keys.npy", "labels.npy", "post_relu.npy"]
        assert np.load(folder / "post_relu.npy", mmap_mode="r").dtype == np.float16
    assert not (tmp_path / "predictions.npz").exists()  # only when asked
    again = run(
        dataclasses.replace(config, predictions=True)
    )  # reads the .npy files; same seed, same numbers
    assert again["backbones"][0]["probe_top1"] == row["probe_top1"]
    predictions = np.load(tmp_path / "predictions.npz")  # per val image, in feature-row order
    val = np.load(next(f for f in cached if ".val." in f.name) / "labels.npy")
    assert np.array_equal(predictions["labels"], val) and len(predictions["keys"]) == n_val
    for kind in ("probe", "knn"):
        assert np.mean(predictions[f"random.{kind}"] == val) == row[f"{kind}_top1"]


def test_run_finetune_one_epoch_and_agreement(demo_shards: dict[str, Path], tmp_path: Path) -> None:
    config = tiny_config(
        demo_shards,
        tmp_path,
        finetune_epochs=1,
        finetune_batch_size=8,
        cache_features=False,
        tap="pre_relu",
        teacher="resnet18",
        teacher_weights="random",
        agreement_views="paper",
    )
    (row,) = run(config)["backbones"]
    assert 0.0 <= row["finetune_top1"] <= 1.0
    assert row["finetune_top1_ci95"][0] <= row["finetune_top1"] <= row["finetune_top1_ci95"][1]
    assert row["agree_cosine"] is None  # no projection given: CKA only
    assert row["agree_cka"] == pytest.approx(1.0, abs=1e-4)  # the teacher is the same seeded random ResNet-18
    assert not (tmp_path / "features").exists()
    assert not list(tmp_path.glob(".features-*"))  # the temporary feature files are gone too


def test_run_agreement_with_projection_artefact(demo_shards: dict[str, Path], tmp_path: Path) -> None:
    projection = pytest.importorskip("pipeline.projection.artefact")
    d = 512  # identity basis: targets are the teacher's own pre-ReLU features
    stats = {k: np.zeros(d) for k in projection.STAT_KEYS}
    stats.update(std_ratio_before=np.array(1.0), std_ratio_after=np.array(1.0), n_rows=np.array(1.0))
    proj = projection.Projection(
        "svd", "none", np.zeros(d, np.float32), np.eye(d, dtype=np.float32), np.ones(d, np.float32),
        np.zeros(0, np.int64), stats=stats,
    )  # fmt: skip
    proj.save(tmp_path / "proj.npz")
    config = tiny_config(
        demo_shards,
        tmp_path / "eval",
        teacher="resnet18",
        teacher_weights="random",
        projection=str(tmp_path / "proj.npz"),
    )
    results = run(config)
    (row,) = results["backbones"]
    # Student and teacher are the same seeded random ResNet-18 on the same centre views of val.
    assert row["agree_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert row["agree_cka"] == pytest.approx(1.0, abs=1e-5)
    assert results["agreement"]["targets_dim"] == d and results["agreement"]["views"] == "center"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_features_match_cpu_within_bf16(demo_shards: dict[str, Path]) -> None:
    model, _ = load_backbone(BackboneSpec("a", "resnet18", "random"), seed=0)
    cpu = extract_features({"a": model}, str(demo_shards["val"]), 32, 8, "cpu")["a"].taps["pre_relu"]
    gpu = extract_features({"a": model}, str(demo_shards["val"]), 32, 8, "cuda")["a"].taps["pre_relu"]
    assert mean_cosine(cpu, gpu) > 0.99  # bf16 autocast + channels_last vs float32


def test_extract_features_bit_identical_with_workers(demo_shards: dict[str, Path], tmp_path: Path) -> None:
    """Batches of 5 over 12 val images in 2 shards of 8 and 4 (batches 5, 3 | 4): any worker count gives the same
    rows, bit for bit, as a direct decode + replay + forward over the samples in shard order; so do float16 feature
    files of one tap (the float32 rows rounded once)."""
    from pipeline.data.shards import iter_samples, list_shards
    from pipeline.evaluation.batches import make_view
    from pipeline.models import FeatureTaps

    model, _ = load_backbone(BackboneSpec("a", "resnet18", "random"), seed=0)
    runs = {
        w: extract_features({"a": model}, str(demo_shards["val"]), 32, 5, workers=w)["a"] for w in (0, 1, 2)
    }
    shards = list_shards(str(demo_shards["val"]))
    samples = [(s, info.name) for info in shards for s in iter_samples(info.path)]
    with torch.no_grad():
        views = torch.stack([make_view(s, where, 32, "center", 0, 0) for s, where in samples[:5]])
        direct = FeatureTaps(model.eval(), ("pre_relu",))(views)["pre_relu"].numpy()
    for feats in runs.values():
        assert feats.keys == [s.key for s, _ in samples] == runs[0].keys
        assert np.array_equal(feats.labels, runs[0].labels)
        for tap, rows in feats.taps.items():
            assert np.array_equal(rows, runs[0].taps[tap]), tap
        assert np.array_equal(feats.taps["pre_relu"][:5], direct)
    for w in (0, 2):
        folder = tmp_path / f"w{w}"
        on_disk = extract_features({"a": model}, str(demo_shards["val"]), 32, 5, workers=w, tap="pre_relu",
                                   folders={"a": folder}, dtype="float16")["a"]  # fmt: skip
        assert list(on_disk.taps) == ["pre_relu"] and isinstance(on_disk.taps["pre_relu"], np.memmap)
        assert np.array_equal(on_disk.taps["pre_relu"], runs[0].taps["pre_relu"].astype(np.float16))
        assert np.array_equal(np.load(folder / "labels.npy"), runs[0].labels)
        assert np.load(folder / "keys.npy").tolist() == runs[0].keys


def test_finetune_same_weights_with_workers(demo_shards: dict[str, Path]) -> None:
    from pipeline.evaluation.finetune import FinetuneRecipe, finetune

    recipe = FinetuneRecipe(epochs=2, batch_size=10)  # 24 train images: batches 10, 10, 4 per epoch
    tuned = []
    for workers in (0, 2):
        model, _ = load_backbone(BackboneSpec("a", "resnet18", "random"), seed=0)
        top1 = finetune(
            model, str(demo_shards["train"]), str(demo_shards["val"]), 4, 32, recipe, 0, "cpu", workers
        )
        tuned.append((top1, model.state_dict()))
    (top_a, a), (top_b, b) = tuned
    assert top_a == top_b and all(torch.equal(a[k], b[k]) for k in a)


def _key_before_numerics(identity: dict, arch: str, split: list, resolution: int) -> str:
    """feature_key as computed before the device type and autocast were keyed (centre view)."""
    import hashlib

    from pipeline.data.shards import shard_record

    body = {"arch": arch, "weights": identity, "shards": [{**shard_record(s), "path": s.path} for s in split],
            "resolution": resolution, "recipe": "center", "seed": None}  # fmt: skip
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_feature_key_covers_device_and_autocast(demo_shards: dict[str, Path]) -> None:
    from pipeline.data.shards import list_shards
    from pipeline.evaluation.feature_files import feature_key
    from pipeline.evaluation.features import eval_numerics

    split, identity = list_shards(str(demo_shards["val"])), {"arch": "resnet18", "seed": 0}
    cpu, cuda = eval_numerics(torch.device("cpu")), eval_numerics(torch.device("cuda"))
    assert cpu == {"device": "cpu", "amp": "off"} and cuda == {"device": "cuda", "amp": "bf16"}
    keys = {
        name: feature_key(identity, "resnet18", split, 32, "center", 0, numerics)
        for name, numerics in {"cpu": cpu, "cuda": cuda, "cuda-fp16": {"device": "cuda", "amp": "fp16"},
                               "cuda-fp32": {"device": "cuda", "amp": "off"}}.items()
    }  # fmt: skip
    assert len(set(keys.values())) == 4
    assert keys["cpu"] == feature_key(identity, "resnet18", split, 32, "center", 0)
    assert keys["cpu"] == _key_before_numerics(identity, "resnet18", split, 32)


def test_cpu_feature_cache_is_reused_on_cpu(demo_shards: dict[str, Path], tmp_path: Path) -> None:
    """A CPU run's feature files carry the key of before (files made then are found) and a second run reads them."""
    from pipeline.data.shards import list_shards

    config = tiny_config(demo_shards, tmp_path, workers=0)
    first = run(config)
    identity = first["backbones"][0]["identity"]
    for split in ("train", "val"):
        key = _key_before_numerics(identity, "resnet18", list_shards(str(demo_shards[split])), 32)
        assert (tmp_path / "features" / f"random.{split}.{key}" / "post_relu.npy").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "features").rglob("*.npy")}
    again = run(config)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and len(stamps) == 6
    assert again["backbones"][0]["probe_top1"] == first["backbones"][0]["probe_top1"]


def test_timm_backbones_parse_and_are_evaluated_with_their_own_normalisation(
    demo_shards: dict[str, Path], tmp_path: Path
) -> None:
    timm = pytest.importorskip("timm")
    from pipeline.data.views import IMAGENET_MEAN, IMAGENET_STD

    assert parse_backbone("v=timm:vit_tiny_patch16_224:random") == BackboneSpec(
        "v", "timm:vit_tiny_patch16_224", "random"
    )
    assert parse_backbone("s=tv:resnet18:a/b.pt").arch == "tv:resnet18"
    with pytest.raises(EvalError, match="expected name=arch:weights"):
        parse_backbone("v=timm:vit_tiny_patch16_224")
    # a ViT (mean/std 0.5, one input side) built for the evaluation's resolution, fed its own normalisation
    vit, identity = load_backbone(
        BackboneSpec("v", "timm:vit_tiny_patch16_224", "random"), seed=0, resolution=32
    )
    assert identity["model_kwargs"] == {"img_size": 32}
    feats = extract_features({"v": vit}, str(demo_shards["val"]), resolution=32, batch_size=6)
    from pipeline.data.shards import list_shards
    from pipeline.evaluation.batches import iter_view_batches

    first, x, _, _ = next(
        iter_view_batches(list_shards(str(demo_shards["val"])), 32, 6, "center", 0, 0, torch.device("cpu"))
    )
    assert first == 0
    x = x.float() if x.dtype != torch.uint8 else x.float() / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    unit = x * std + mean if x.min() < 0 else x  # back to [0, 1] when the batch came normalised
    with torch.no_grad():
        own = vit.eval().forward_head(vit.forward_features((unit - 0.5) / 0.5), pre_logits=True)
    np.testing.assert_allclose(feats["v"].taps["post_relu"][:6], own.numpy(), rtol=1e-4, atol=1e-4)
    results = run(tiny_config(demo_shards, tmp_path, backbones=("v=timm:vit_tiny_patch16_224:random",)))
    assert (
        results["backbones"][0]["arch"] == "timm:vit_tiny_patch16_224"
        and results["backbones"][0]["dim"] == 192
    )
    del timm
