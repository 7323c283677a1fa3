"""`kdep eval` at scale, against references: the torch probe against scikit-learn, blocked k-NN against one block
and a brute-force numpy vote, feature files against in-memory rows, fine-tuning's byte-range reads against the
samples read whole, and the one-process / one-device rules.

- Torch probe vs scikit-learn on the same features (the eval tests' class-coded and label-free features, and a
  random ResNet-18's demo features): top-1, the C sweep and the chosen C within 0.5 point; the fitted weights
  equal a tightly converged scikit-learn fit's (K = 5 and K = 2: C means the same); blocks and warm starts do not
  move the optimum.
- k-NN over blocks of train rows: the same predictions as one block and as a numpy argsort + vote.
- Extraction: workers own whole shards (each shard parsed by one worker); a shard whose count differs from its
  index is an error naming it; float16 files refuse features float16 cannot hold, naming the fix.
- Fine-tuning batches read by byte range equal batches made from the samples read whole (old in-memory path).
- Under torchrun (WORLD_SIZE=2) `kdep eval` stops in one line before writing anything; a timm model's
  re-normalisation buffers move with it to the evaluation device (checked on the meta device).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.data.shards import iter_samples, list_shards
from pipeline.errors import KdepError
from pipeline.evaluation import logistic
from pipeline.evaluation.backbones import BackboneSpec, EvalError
from pipeline.evaluation.batches import ShardViewBatches, make_view, shard_rows
from pipeline.evaluation.features import extract_features, load_backbone, taps_on_device
from pipeline.evaluation.probes import knn_predict, linear_probe
from pipeline.evaluation.train_samples import EpochBatches, index_samples
from stages.cli import app
from stages.evaluate import EvalConfig, run

TOLERANCE = 0.005  # half a point of top-1


def class_coded(n_per_class: int, classes: int, dim: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    codes = rng.normal(size=(classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    return (codes[y] + noise * rng.normal(size=(len(y), dim))).astype(np.float32), y


def both_backends(x_train, y_train, x_val, y_val, **kw):
    return [linear_probe(x_train, y_train, x_val, y_val, backend=b, **kw) for b in ("torch", "sklearn")]


def assert_same_probe(a, b) -> None:
    """Top-1 within half a point and the same C; each sweep top-1 within one held-out row (scikit-learn's default
    tol 1e-4 stops short at weak regularisation: on the class-coded set its C = 10 fit differs from its own fit at
    tol 1e-10 by one held-out row, and the torch fit agrees with the latter)."""
    assert abs(a.top1 - b.top1) <= TOLERANCE and a.c == b.c and set(a.sweep) == set(b.sweep)
    assert a.sweep_rows == b.sweep_rows
    assert all(abs(a.sweep[c] - b.sweep[c]) <= max(TOLERANCE, 1.001 / a.sweep_rows) for c in a.sweep)


def test_torch_probe_matches_sklearn_on_class_coded_and_label_free_features() -> None:
    x_train, y_train = class_coded(60, 5, 32, 3.0, seed=0)  # noisy: top-1 well below 1
    x_val, y_val = class_coded(200, 5, 32, 3.0, seed=0)
    x_val = x_val + np.random.default_rng(1).normal(0, 3.0, x_val.shape).astype(np.float32)
    torch_probe, sk_probe = both_backends(x_train, y_train, x_val, y_val, seed=0)
    assert 0.3 < sk_probe.top1 < 0.95 and torch_probe.converged and sk_probe.converged
    assert_same_probe(torch_probe, sk_probe)
    x_train, y_train = class_coded(30, 5, 64, 0.01, seed=0)  # test_eval's near-noiseless features: 100%
    x_val, y_val = class_coded(10, 5, 64, 0.01, seed=0)
    perfect = both_backends(x_train, y_train, x_val, y_val, seed=0)
    assert perfect[0].top1 == perfect[1].top1 == 1.0
    rng = np.random.default_rng(2)  # test_eval's label-free features: chance level for both
    x_train, x_val = rng.normal(size=(400, 32)), rng.normal(size=(2000, 32))
    y_train, y_val = rng.integers(0, 4, 400), rng.integers(0, 4, 2000)
    assert_same_probe(*both_backends(x_train, y_train, x_val, y_val, cs=(0.1,)))


def test_torch_probe_matches_sklearn_on_demo_features(demo_shards: dict[str, Path]) -> None:
    model, _ = load_backbone(BackboneSpec("a", "resnet18", "random"), seed=0)
    train, val = (
        extract_features({"a": model}, str(demo_shards[s]), 32, 8, tap="post_relu")["a"]
        for s in ("train", "val")
    )
    x_train, x_val = train.taps["post_relu"].astype(np.float16), val.taps["post_relu"].astype(np.float16)
    torch_probe, sk_probe = both_backends(x_train, train.labels, x_val, val.labels, cs=(0.1, 1.0), seed=0)
    assert_same_probe(torch_probe, sk_probe)


@pytest.mark.parametrize("classes", [5, 2])
def test_torch_probe_solves_sklearns_objective(classes: int) -> None:
    """Weights equal scikit-learn's (converged to tol 1e-10, in float64) at every C: same objective, same C. For K = 2
    scikit-learn's one vector w is the softmax's W_1 - W_0 with W_0 = -w / 2."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = class_coded(80, classes, 12, 2.0, seed=3)
    x = (
        x * np.linspace(0.1, 10, 12, dtype=np.float32) + 7
    )  # unequal scales and an offset: standardisation matters
    z = StandardScaler().fit_transform(x.astype(np.float64))
    solver = logistic.make_solver("torch", x, y, torch.device("cpu"), 2000)
    for c in (0.01, 1.0, 10.0):
        assert solver.fit(None, c)
        ref = LogisticRegression(C=c, tol=1e-10, max_iter=100_000).fit(z, y)
        w = ref.coef_.T if classes > 2 else np.stack([-ref.coef_[0] / 2, ref.coef_[0] / 2], 1)
        got = solver.model.weight.numpy()
        assert np.abs(got - w).max() <= 2e-3 * np.abs(w).max(), c


def test_torch_probe_blocks_and_warm_starts_do_not_move_the_optimum(monkeypatch) -> None:
    x, y = class_coded(50, 4, 16, 2.0, seed=4)
    cold = logistic.make_solver("torch", x, y, torch.device("cpu"), 1000)
    cold.fit(None, 1.0)
    warm = logistic.make_solver("torch", x, y, torch.device("cpu"), 1000)
    warm.fit(np.arange(0, 200, 2), 0.01)  # a different start: another C on half the rows
    warm.fit(None, 1.0)
    monkeypatch.setattr(logistic, "BLOCK_ELEMENTS", 16 * 7)  # blocks of 7 rows
    blocked = logistic.make_solver("torch", x, y, torch.device("cpu"), 1000)
    assert blocked.block == 7
    blocked.fit(None, 1.0)
    ref = cold.model.weight.numpy()
    for other in (warm, blocked):
        assert np.abs(other.model.weight.numpy() - ref).max() <= 1e-3 * np.abs(ref).max()
        assert np.array_equal(other.predict(x), cold.predict(x))


def test_knn_over_blocks_equals_one_block_and_a_numpy_vote() -> None:
    rng = np.random.default_rng(5)
    x_train, y_train = rng.normal(size=(300, 16)).astype(np.float32), rng.integers(0, 6, 300)
    x_val = rng.normal(size=(50, 16)).astype(np.float32)
    one = knn_predict(x_train, y_train, x_val, k=7, bank_block=10_000, query_block=10_000)
    blocked = knn_predict(x_train, y_train, x_val, k=7, bank_block=13, query_block=4)
    sims = (x_val / np.linalg.norm(x_val, axis=1, keepdims=True)) @ (
        x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
    ).T
    ref = []
    for row in sims:
        near = np.argsort(-row)[:7]
        votes = np.bincount(y_train[near], minlength=6).astype(float)
        sim_sums = np.bincount(y_train[near], weights=row[near], minlength=6)
        ref.append(int(np.argmax(votes * 4 * 7 + sim_sums)))
    assert one.tolist() == blocked.tolist() == ref


def test_extraction_workers_own_whole_shards(demo_shards: dict[str, Path], monkeypatch) -> None:
    """Worker w of 2 opens only shards w, w + 2, ...: each shard is parsed by exactly one worker."""
    import pipeline.evaluation.batches as batches

    shards = list_shards(str(demo_shards["train"]))  # 3 shards
    opened: dict[int, list[str]] = {0: [], 1: []}
    real = batches.iter_samples

    def reader(worker: int):
        def read(path: str):
            opened[worker].append(path)
            return real(path)

        return read

    for worker in (0, 1):
        monkeypatch.setattr(batches, "_worker_slot", lambda w=worker: (w, 2))
        monkeypatch.setattr(batches, "iter_samples", reader(worker))
        firsts = [first for first, *_ in ShardViewBatches(shards, shard_rows(shards), 32, 8, "center", 0)]
        assert firsts == (
            [0, 16] if worker == 0 else [8]
        )  # each shard's rows start at its place in the split
    assert opened == {0: [shards[0].path, shards[2].path], 1: [shards[1].path]}


@pytest.mark.parametrize("listed", [7, 9])
def test_a_shard_whose_count_differs_from_its_index_is_named(
    demo_shards: dict[str, Path], tmp_path: Path, listed: int
) -> None:
    val = tmp_path / "val"
    shutil.copytree(demo_shards["val"], val)
    index = json.loads((val / "index.json").read_text())
    index["shards"][0]["samples"] = listed  # the tar holds 8
    (val / "index.json").write_text(json.dumps(index))
    model, _ = load_backbone(BackboneSpec("a", "resnet18", "random"), seed=0)
    seen = "more than 7" if listed == 7 else "8"  # a longer tar stops at the first extra sample
    with pytest.raises(EvalError, match=rf"val-000000\.tar: {seen} samples but {listed} were listed"):
        extract_features({"a": model}, str(val), 32, 4, tap="post_relu", folders={"a": tmp_path / "f"})
    assert not (tmp_path / "f").exists() or not any((tmp_path / "f").iterdir())  # nothing half-written left


def test_float16_files_refuse_features_float16_cannot_hold(
    demo_shards: dict[str, Path], tmp_path: Path
) -> None:
    """A random-init MobileNetV2's pooled features are ~4e-9 (float16 zeros): an error naming the fix; float32 works."""
    model, _ = load_backbone(BackboneSpec("m", "mobilenet_v2", "random"), seed=0)
    folder = tmp_path / "m.val"
    with pytest.raises(
        EvalError,
        match=r"backbone 'm' tap post_relu on .*below float16's normal range.*--feature-dtype float32",
    ):
        extract_features({"m": model}, str(demo_shards["val"]), 32, 6, tap="post_relu", folders={"m": folder},
                         dtype="float16")  # fmt: skip
    assert not folder.exists() or not any(folder.iterdir())
    feats = extract_features({"m": model}, str(demo_shards["val"]), 32, 6, tap="post_relu", folders={"m": folder},
                             dtype="float32")["m"]  # fmt: skip
    rows = feats.taps["post_relu"]
    assert rows.dtype == np.float32 and 0 < np.abs(rows).max() < 1e-4
    assert sorted(p.name for p in folder.iterdir()) == ["keys.npy", "labels.npy", "post_relu.npy"]


def test_finetune_batches_by_byte_range_equal_the_samples_read_whole(demo_shards: dict[str, Path]) -> None:
    shards = list_shards(str(demo_shards["train"]))
    index = index_samples(shards)
    whole = [(s, info.name) for info in shards for s in iter_samples(info.path)]
    assert [k.decode() for k in index.key] == [s.key for s, _ in whole] and len(index) == 24
    epochs = EpochBatches(index, epochs=2, batch_size=10, resolution=32, recipe="paper", seed=0)
    assert epochs.per_epoch == 3 and len(epochs) == 6  # batches 10, 10, 4 per epoch
    for i in (0, 2, 4):
        epoch, views, labels = epochs[i]
        start = (i % 3) * 10
        chosen = np.random.default_rng([0, epoch]).permutation(24)[start : start + 10]  # the in-memory recipe
        ref = torch.stack([make_view(*whole[j], 32, "paper", 0, epoch) for j in chosen])
        assert torch.equal(views, ref)
        assert labels.tolist() == [int(whole[j][0].fields["cls"]) for j in chosen]
    drawn = epochs.order(1)
    epochs[5]
    assert epochs.order(1) is drawn  # one permutation per epoch, not per batch


def test_eval_refuses_torchrun_in_one_line_before_any_file(
    demo_shards: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = EvalConfig(train=str(demo_shards["train"]), val=str(demo_shards["val"]), out=str(out),
                        backbones=("r=resnet18:random",), resolution=32)  # fmt: skip
    message = "kdep eval runs in one process, not on 2 ranks; run it without torchrun (it uses one device: --device cuda)"
    with pytest.raises(KdepError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
        run(config)
    args = ["eval", "--train", str(demo_shards["train"]), "--val", str(demo_shards["val"]), "--out", str(out),
            "--backbone", "r=resnet18:random", "--resolution", "32"]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"WORLD_SIZE": "2"})
    assert result.exit_code == 1 and result.output == f"error: {message}\n"
    assert not out.exists()


def test_renormalisation_buffers_move_with_the_model_to_the_eval_device() -> None:
    """A timm ViT (mean/std 0.5, not ImageNet's) on the meta device: every parameter and buffer is there, the
    re-normalisation's scale and shift included (they stayed on the CPU when built after the move)."""
    pytest.importorskip("timm")
    vit, _ = load_backbone(BackboneSpec("v", "timm:vit_tiny_patch16_224", "random"), seed=0, resolution=32)
    taps = taps_on_device(vit, ("post_relu",), torch.device("meta"))
    buffers = dict(taps.named_buffers())
    assert {"normalize.scale", "normalize.shift"} <= set(buffers)
    tensors = [*taps.parameters(), *buffers.values()]
    assert tensors and all(t.device.type == "meta" for t in tensors)


def test_feature_files_of_earlier_versions_are_read(
    demo_shards: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """A ``<name>.<split>.<key>.npz`` of the earlier format (every tap, float32) is reused: nothing is extracted and
    the probe scores its rows."""
    import stages.evaluate as stage
    from pipeline.evaluation.feature_files import FEATURES_FORMAT, feature_key
    from pipeline.evaluation.features import eval_numerics

    model, identity = load_backbone(BackboneSpec("random", "resnet18", "random"), seed=0, resolution=32)
    feats = {}
    for split in ("train", "val"):
        shards = list_shards(str(demo_shards[split]))
        key = feature_key(identity, "resnet18", shards, 32, "center", 0, eval_numerics(torch.device("cpu")))
        feats[split] = f = extract_features({"a": model}, shards, 32, 8)["a"]
        (tmp_path / "features").mkdir(exist_ok=True)
        np.savez(tmp_path / "features" / f"random.{split}.{key}.npz", format=np.array(FEATURES_FORMAT),
                 labels=f.labels, keys=np.array(f.keys), **{f"tap_{t}": v for t, v in f.taps.items()})  # fmt: skip
    monkeypatch.setattr(stage, "extract_features", lambda *a, **k: pytest.fail("extracted again"))
    config = EvalConfig(train=str(demo_shards["train"]), val=str(demo_shards["val"]), out=str(tmp_path),
                        backbones=("random=resnet18:random",), resolution=32, probe_cs=(0.1, 1.0), knn_k=5)  # fmt: skip
    (row,) = run(config)["backbones"]
    train, val = feats["train"], feats["val"]
    direct = linear_probe(
        train.taps["post_relu"], train.labels, val.taps["post_relu"], val.labels, (0.1, 1.0)
    )
    assert row["feature_dtype"] == "float32" and row["probe_top1"] == direct.top1
    assert not [p for p in (tmp_path / "features").iterdir() if p.is_dir()]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_probe_knn_and_timm_eval_on_cuda(demo_shards: dict[str, Path], tmp_path: Path) -> None:
    """The probe and k-NN on CUDA against the CPU (same C, top-1 within half a point, same neighbours' votes), and
    `kdep eval --device cuda` of a timm ViT whose mean/std is not ImageNet's (its re-normalisation on the GPU)."""
    x_train, y_train = class_coded(60, 5, 32, 3.0, seed=0)
    x_val, y_val = class_coded(200, 5, 32, 3.0, seed=0)  # the same class codes
    x_val = x_val + np.random.default_rng(1).normal(0, 3.0, x_val.shape).astype(np.float32)
    cpu, gpu = (linear_probe(x_train, y_train, x_val, y_val, device=d) for d in ("cpu", "cuda"))
    assert cpu.c == gpu.c and abs(cpu.top1 - gpu.top1) <= TOLERANCE and gpu.converged
    assert (
        knn_predict(x_train, y_train, x_val, 7, "cuda").tolist()
        == knn_predict(x_train, y_train, x_val, 7).tolist()
    )
    pytest.importorskip("timm")
    config = EvalConfig(train=str(demo_shards["train"]), val=str(demo_shards["val"]), out=str(tmp_path),
                        backbones=("v=timm:vit_tiny_patch16_224:random",), resolution=32, device="cuda",
                        probe_cs=(0.1, 1.0), knn_k=5)  # fmt: skip
    (row,) = run(config)["backbones"]
    assert 0.0 <= row["probe_top1"] <= 1.0 and row["dim"] == 192
