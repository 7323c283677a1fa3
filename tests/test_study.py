"""`kdep study views`: the whole study on tiny data through the CLI (every step, every table column, reuse on a
re-run, refusal of changed settings); the arms' pairing (the same images in the same order and the same
initialisation per seed, whatever the views) against the real training loader and a one-step train-student run;
the paired-difference interval and the cost ratio against hand computations; the validity verdict both ways on a
synthetic summary; and the per-arm intervals against hand computations of the documented formula (Wilson for one
seed; mean +- t_nu sqrt(s^2/S + e) with Welch-Satterthwaite nu for several)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import torchvision
from scipy import stats
from typer.testing import CliRunner

from pipeline.cache.join import source_shard_paths
from pipeline.cache.store import open_store
from pipeline.evaluation.intervals import wilson_interval
from pipeline.evaluation.probes import mean_cosine
from pipeline.evaluation.seed_intervals import accuracy_over_seeds, mean_over_seeds, paired_difference
from pipeline.manifest import ConfigError
from pipeline.runtime import Dist
from pipeline.student.loaders import PairLoaders
from pipeline.student.pairs import fresh_view
from pipeline.student.setup import loader_spec
from stages.cache_teacher import CacheTeacherConfig
from stages.cache_teacher import run as cache_run
from stages.cli import app
from stages.config import StudyViewsConfig
from stages.fit_svd import FitSvdConfig
from stages.fit_svd import run as fit_run
from stages.train_student import run as train_run
from stages.train_student import train_spec
from studies.common import StudyPaths, row_cosines
from studies.views import arms, random_init, train_config
from studies.views_report import CSV_COLUMNS, markdown_study, summarise
from studies.views_table import cost_ratio

runner = CliRunner()
STUDENT = "timm:test_resnet"  # the CPU profile's student: 96-d pre_relu


def _manifest(tmp_path):
    """Arms online, k1 and k2 from a 2-view cache, 2 seeds, 4 classes x 6 train / 3 val, 2 epochs."""
    path = tmp_path / "study.yaml"
    path.write_text(f"""
study: {{out: {tmp_path / "study"}, ks: [1, 2], views: 2, seeds: 2, epochs: 2, classes: 4, train_per_class: 6,
        val_per_class: 3, per_shard: 8, min_side: 32, max_side: 64, resolution: 32, teacher_epochs: 1,
        student: "{STUDENT}", dim: 96, batch_size: 8, knn_k: 3, agreement_images: 0, workers: 0, device: cpu,
        quiet: true, threads: 1}}
""")
    return path


def test_study_runs_end_to_end_and_writes_every_column(tmp_path):
    manifest = _manifest(tmp_path)
    threads = torch.get_num_threads()
    result = runner.invoke(app, ["study", "views", "--manifest", str(manifest)])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == threads  # `threads: 1` holds inside the study only
    out = tmp_path / "study"
    with open(out / "study.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS and [r["arm"] for r in rows] == ["online", "k1", "k2"]
    assert [float(r["uses_per_view"]) for r in rows] == [1.0, 2.0, 1.0]  # epochs / k; online: each view once
    for row in rows:
        filled = {k: v for k, v in row.items() if v != "" and k not in ("arm", "k")}
        assert all(math.isfinite(float(v)) for v in filled.values()), row
        for m in ("probe_top1", "knn_top1", "agree_cosine"):
            assert float(row[f"{m}_low"]) <= float(row[m]) <= float(row[f"{m}_high"])
    for row in rows[
        1:
    ]:  # every cached arm: its paired difference to online and the cost ratio, with intervals
        for col in ("probe_top1_delta", "knn_top1_delta_low", "agree_cosine_delta_high", "epoch_seconds_ratio",
                    "cpu_seconds_ratio_low", "wall_seconds_ratio_high"):  # fmt: skip
            assert row[col] != "", col
    summary = json.loads((out / "study.json").read_text())
    assert [(r["arm"], r["seed"]) for r in summary["runs"]] == [
        ("online", 0), ("k1", 0), ("k2", 0), ("online", 1), ("k1", 1), ("k2", 1), ("random", 0), ("random", 1)
    ]  # fmt: skip  # seed by seed: every arm of seed 0 first
    assert all(
        r["epoch_seconds"] > 0 and r["cpu_seconds"] > 0 for r in summary["runs"] if r["arm"] != "random"
    )
    assert summary["data"]["val_samples"] == 12 and summary["data"]["agreement_views"] == "paper"
    assert set(summary["verdict"]) == {"valid", "reasons", "rule"}
    provenance = json.loads((out / "students" / "online-s1" / "provenance.json").read_text())
    assert provenance["run"]["views"] == "fresh" and provenance["config"]["seed"] == 1
    assert (
        json.loads((out / "students" / "k1-s0" / "provenance.json").read_text())["config"]["views_used"] == 1
    )
    predictions = np.load(out / "eval" / "predictions.npz")
    k1 = next(r for r in summary["runs"] if r["name"] == "k1-s0")
    assert np.mean(predictions["k1-s0.knn"] == predictions["labels"]) == k1["knn_top1"]
    table = (out / "study.md").read_text()
    for label in ("online KD (fresh views)", "k = 2 cached", "random-init student (2 inits)",
                  "teacher (labelled, reference)", "cached arm − online", "online / cached, s per epoch"):  # fmt: skip
        assert label in table
    assert ("cannot answer" in table) != summary["verdict"]["valid"]
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # a PNG, not an empty file
    # A re-run reuses every student; settings that changed an artefact are refused before anything runs.
    stamp = (out / "students" / "k1-s0" / "done.json").stat().st_mtime_ns
    again = runner.invoke(app, ["study-views", "--manifest", str(manifest), "--knn-k", "2"])
    assert again.exit_code == 0, again.output
    assert (out / "students" / "k1-s0" / "done.json").stat().st_mtime_ns == stamp
    changed = runner.invoke(app, ["study-views", "--manifest", str(manifest), "--set", "study.lr=0.2"])
    assert changed.exit_code == 1 and "lr: 0.1 -> 0.2" in changed.output


@pytest.fixture(scope="module")
def cached(demo_shards, tmp_path_factory) -> tuple[StudyViewsConfig, StudyPaths]:
    """A 3-view cache of a random ResNet-18 teacher over the demo shards, SVD + PTS to the student's 96."""
    d = tmp_path_factory.mktemp("pairs")
    paths = StudyPaths(d, demo_shards["train"].parent, d / "teacher.pt", d / "cache", d / "proj.npz", d / "students",
                       d / "eval")  # fmt: skip
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), paths.teacher)
    cache_run(CacheTeacherConfig(shards=str(demo_shards["train"]), out=str(paths.cache), teacher="resnet18",
                                 weights=str(paths.teacher), views=3, resolution=32, batch_size=6, workers=0,
                                 device="cpu", quiet=True, dtype="float32"))  # fmt: skip
    fit_run(FitSvdConfig(cache=str(paths.cache), out=str(paths.projection), dim=96, quiet=True))
    config = StudyViewsConfig(out=str(d), ks=(1, 3), views=3, epochs=2, student=STUDENT, dim=96, resolution=32,
                              batch_size=4, workers=1, device="cpu", quiet=True)  # fmt: skip
    return config, paths


def _epoch_ids(config, paths, arm: str, seed: int, epochs: int) -> list[np.ndarray]:
    """The (shard, row, view) of every sample, in the order the study's train-student loader delivers them."""
    spec, _ = train_spec(train_config(config, paths, arm, seed, paths.out / "unused"))
    store = open_store(paths.cache)
    spec_ = loader_spec(
        spec, str(paths.cache), tuple(source_shard_paths(store)), 32, Dist(), torch.device("cpu")
    )
    loaders = PairLoaders(spec_, store)
    return [torch.cat([ids for _, _, ids in loaders.for_epoch(e)]).numpy() for e in range(epochs)]


def test_arms_differ_only_in_their_views(cached, tmp_path):
    """online (fresh views, the live teacher) first, then k ascending; one seed's train-student settings are the
    same in every arm but for the views; another seed changes only the seed."""
    config, paths = cached
    assert arms(replace(config, ks=(16, 1, 4), views=16)) == ["online", "k1", "k4", "k16"]
    views = {"online_teacher", "fresh_views", "views_used"}
    settings = {arm: asdict(train_config(config, paths, arm, 3, tmp_path)) for arm in arms(config)}
    assert {k: settings["online"][k] for k in views} == {"online_teacher": True, "fresh_views": True,
                                                           "views_used": 0}  # fmt: skip
    for arm, k in (("k1", 1), ("k3", 3)):
        assert {k_: settings[arm][k_] for k_ in views} == {"online_teacher": False, "fresh_views": False,
                                                            "views_used": k}  # fmt: skip
    rest = [{k: v for k, v in s.items() if k not in views} for s in settings.values()]
    assert all(r == rest[0] for r in rest) and rest[0]["seed"] == 3
    other = asdict(train_config(config, paths, "k1", 4, tmp_path))
    assert {k for k in other if other[k] != settings["k1"][k]} == {"seed"}


def test_arms_of_one_seed_see_the_same_images_in_the_same_order(cached):
    config, paths = cached
    orders = {}
    for seed in (0, 1):
        ids = {arm: _epoch_ids(config, paths, arm, seed, 3) for arm in ("online", "k1", "k3")}
        for epoch in range(3):
            order = ids["online"][epoch][:, :2]
            assert len(order) == 24 and len({tuple(x) for x in order}) == 24  # every image once
            for arm in ("k1", "k3"):
                assert np.array_equal(ids[arm][epoch][:, :2], order), (seed, epoch, arm)
            assert (ids["online"][epoch][:, 2] == fresh_view(epoch)).all() and (
                ids["k1"][epoch][:, 2] == 0
            ).all()
            assert set(ids["k3"][epoch][:, 2]) <= {0, 1, 2}
            orders[seed, epoch] = order
    assert not np.array_equal(orders[0, 0], orders[1, 0]) and not np.array_equal(orders[0, 0], orders[0, 1])


def test_every_arm_of_a_seed_starts_from_that_seeds_random_init(cached, tmp_path):
    """One train-student step at lr 1e-9 leaves the parameters at the init (within 1e-6): online and cached arms
    of seed 1 start from the study's random-s1 backbone (the reference row), not from random-s0."""
    config, paths = cached
    inits = {s: torch.load(random_init(config, paths, s)["backbone"]) for s in (0, 1)}
    for arm in ("online", "k3"):
        run_config = train_config(config, paths, arm, 1, tmp_path / arm)
        train_run(replace(run_config, lr=1e-9, epochs=1, max_steps=1))
        done = json.loads((tmp_path / arm / "done.json").read_text())
        trained = torch.load(next(iter(done["students"].values()))["backbone"])
        weights = [k for k, v in trained.items() if v.is_floating_point() and "running" not in k]
        assert all(torch.allclose(trained[k], inits[1][k], atol=1e-6) for k in weights), arm
        assert not torch.allclose(trained["conv1.0.weight"], inits[0]["conv1.0.weight"])


def test_paired_difference_against_a_hand_computation():
    """D = A - B = [[0,1,0,0],[1,0,-1,0],[0,0,1,0]] (3 seeds x 4 images): d = 1/6; per-seed means (1/4, 0, 1/4),
    s_d^2 = 1/48, s_d^2/S = 1/144; per-image means (1/3, 1/3, 0, 0), Var_i = 1/27, e = 1/108; V = 7/432,
    nu = 2 (V / (1/144))^2 = 98/9 = 10.89; t(0.975, 10.89) lies between the table's 2.201 (11) and 2.228 (10)."""
    a = np.array([[1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 0]])
    b = np.array([[1, 0, 0, 1], [0, 0, 1, 1], [1, 1, 0, 0]])
    s = paired_difference(a, b, (-1.0, 1.0))
    assert s.mean == pytest.approx(1 / 6) == pytest.approx(a.mean() - b.mean())
    assert s.seed_sd == pytest.approx(math.sqrt(1 / 48)) and s.eval_se == pytest.approx(math.sqrt(1 / 108))
    assert s.dof == pytest.approx(98 / 9)
    half = s.high - 1 / 6
    assert half == pytest.approx(stats.t.ppf(0.975, 98 / 9) * math.sqrt(7 / 432))
    assert 2.201 * math.sqrt(7 / 432) < half < 2.228 * math.sqrt(7 / 432) and s.low == pytest.approx(
        1 / 6 - half
    )
    one = paired_difference(np.array([[0, 1, 0, 0, 1]]), np.array([[0, 0, 0, 1, 0]]), (-1.0, 1.0))
    assert one.mean == pytest.approx(0.2) and one.high - 0.2 == pytest.approx(1.959964 * math.sqrt(0.7 / 5))
    assert one.low == pytest.approx(
        0.2 - 1.959964 * math.sqrt(0.7 / 5)
    )  # e = Var(0, 1, 0, -1, 1) / 5 = 0.7 / 5


def test_cost_ratio_against_a_hand_computation():
    """Online 2 s and 4 s against cached 1 s and 1 s: log ratios ln 2, ln 4; geometric mean 2^1.5; half-width of
    the log = t(0.975, 1) * sd / sqrt(2) = 12.706 * (ln 2 / sqrt 2) / sqrt 2."""
    r = cost_ratio([2.0, 4.0], [1.0, 1.0])
    half = 12.7062 * math.log(2) / 2
    assert r["ratio"] == pytest.approx(2**1.5)
    assert r["ratio_ci95"] == pytest.approx([2**1.5 / math.exp(half), 2**1.5 * math.exp(half)], rel=1e-4)
    assert cost_ratio([2.0, None], [1.0, 1.0]) is None


def _summary(
    correct: dict[str, list], cosine: dict[str, list], epoch_seconds: dict[str, float | list]
) -> dict:
    """A summary from given per-image values: ``correct[arm]`` (S, M) probe (and k-NN) correctness per seed and
    val image, ``cosine[arm]`` (S, N) cosines per seed and held-out view, ``epoch_seconds[arm]`` one per seed (or one
    for all seeds). Arms: online, k<k> and random (the inits). The runs are handed over out of order (the cached
    arms first, online's seeds reversed: the table must pair by seed, not by position); the teacher is fixed."""
    seeds, images = np.shape(next(iter(correct.values())))
    labels = np.arange(images) % 4
    ks = tuple(sorted(int(a[1:]) for a in correct if a not in ("online", "random")))
    config = StudyViewsConfig(ks=ks, views=max(ks), seeds=seeds, epochs=4)
    runs, inits, backbones, predictions, rows, per_image = [], [], [], {"labels": labels}, {}, {}
    for arm, values in correct.items():
        times = np.broadcast_to(epoch_seconds.get(arm, 1.0), (seeds,))
        for seed in range(seeds):
            name = f"{arm}-s{seed}"
            record = {"name": name, "arm": arm, "k": None if arm in ("online", "random") else int(arm[1:]),
                      "seed": seed, "backbone": "-", "epoch_seconds": float(times[seed]), "wall_seconds": 1.0,
                      "cpu_seconds": 1.0}  # fmt: skip
            (inits if arm == "random" else runs).append(record)
            right = np.asarray(values[seed], dtype=bool)
            for kind in ("probe", "knn"):
                predictions[f"{name}.{kind}"] = np.where(right, labels, (labels + 1) % 4)
            backbones.append(
                {"name": name, "probe_top1": float(right.mean()), "knn_top1": float(right.mean())}
            )
            per_image[name] = np.asarray(cosine[arm][seed], dtype=np.float64)
            rows[name] = {"agree_cosine": float(per_image[name].mean()), "agree_cosine_sd": float(per_image[name].std(ddof=1))}  # fmt: skip
    backbones.append({"name": "teacher", "probe_top1": 0.9, "probe_top1_ci95": [0.85, 0.93], "knn_top1": 0.9,
                      "knn_top1_ci95": [0.85, 0.93]})  # fmt: skip
    results = {"backbones": backbones, "data": {"val_samples": images, "train_samples": 100}}
    cosines = {
        "images": len(cosine["online"][0]),
        "views": "paper",
        "seed": 7,
        "rows": rows,
        "per_image": per_image,
    }
    timing = {
        "seconds": 60.0,
        "cpu_seconds": 50.0,
        "load_average_start": [1, 1, 1],
        "load_average_end": [1, 1, 1],
    }
    shuffled = [r for r in runs if r["arm"] != "online"] + [r for r in runs if r["arm"] == "online"][::-1]
    return summarise(config, shuffled, inits[::-1], results, predictions, cosines, timing)


def _synthetic(accuracy: dict[str, float], seeds: int = 3, images: int = 400) -> dict:
    """A summary from made-up scores: each arm's students get ``accuracy`` of ``images`` right (probe and k-NN
    alike, a different subset per seed), the random inits ``accuracy['random']``; online is twice as slow."""
    correct = {arm: [np.roll(np.arange(images) < round(acc * images), 7 * seed) for seed in range(seeds)]
               for arm, acc in accuracy.items()}  # fmt: skip
    cosine = {arm: [np.linspace(0.2, 0.6, 50) + 0.01 * seed for seed in range(seeds)] for arm in accuracy}
    return _summary(correct, cosine, {"online": 2.0})


def test_the_table_against_a_hand_computation():
    """2 seeds x 4 val images, 3 held-out views.
    Probe: online (1,1,1,0) (1,1,1,1) = 0.75, 1.0; k1 (1,0,1,0) (0,0,1,1) = 0.5, 0.5.
    - online's row: m = 7/8, s^2/S = 1/64, e = (7/8)(1/8)/4 = 7/256, V = 11/256, nu = (V / (1/64))^2 = 121/16;
      t(0.975, 7.5625) lies between the table's 2.306 (8) and 2.365 (7); the upper end clipped to 1.
    - k1's row: no seed spread, e = 1/16, the normal quantile: 0.5 +- 1.96 / 4.
    - k1 - online: per seed -1/4, -1/2: d = -3/8, s_d^2/S = 1/64; per-image means (-1/2, -1, 0, 0), Var = 11/48,
      e = 11/192; V = 7/96, nu = (V / (1/64))^2 = 196/9 = 21.8: t between 2.074 (22) and 2.080 (21).
    Cosine k1 - online: per view (-.1, 0, -.2), (-.1, -.2, -.2): per seed -0.1, -1/6, d = -2/15, s_d^2/S = 1/900;
    per-view means (-.1, -.1, -.2), Var = 1/300, e = 1/900; V = 2/900, nu = 4: d +- 2.776 sqrt(2/900).
    Seconds per epoch online 2, 3 against k1 1, 1: sqrt(6) [x / e^h, x e^h], h = 12.706 ln(3/2) / 2."""
    correct = {"online": [[1, 1, 1, 0], [1, 1, 1, 1]], "k1": [[1, 0, 1, 0], [0, 0, 1, 1]],
               "random": [[1, 0, 0, 0], [0, 1, 0, 0]]}  # fmt: skip
    cosine = {"online": [[0.5, 0.6, 0.7], [0.6, 0.7, 0.8]], "k1": [[0.4, 0.6, 0.5], [0.5, 0.5, 0.6]],
              "random": [[0.0, 0.0, 0.1], [0.1, 0.0, 0.0]]}  # fmt: skip
    summary = _summary(correct, cosine, {"online": [2.0, 3.0], "k1": [1.0, 1.0]})
    online, k1 = summary["rows"]
    assert (online["arm"], k1["arm"]) == ("online", "k1")
    half = online["probe_top1"] - online["probe_top1_ci95"][0]
    assert online["probe_top1"] == 0.875 and online["probe_top1_ci95"][1] == 1.0
    assert 2.306 * math.sqrt(11 / 256) < half < 2.365 * math.sqrt(11 / 256)
    assert half == pytest.approx(stats.t.ppf(0.975, 121 / 16) * math.sqrt(11 / 256))
    assert k1["probe_top1_ci95"] == pytest.approx([0.5 - 1.959964 / 4, 0.5 + 1.959964 / 4])
    assert k1["probe_top1_delta"] == pytest.approx(-3 / 8) and k1["knn_top1_delta"] == pytest.approx(-3 / 8)
    half = k1["probe_top1_delta_ci95"][1] + 3 / 8
    assert 2.074 * math.sqrt(7 / 96) < half < 2.080 * math.sqrt(7 / 96)
    assert k1["probe_top1_delta_ci95"][0] == pytest.approx(-3 / 8 - half)
    assert k1["agree_cosine_delta"] == pytest.approx(-2 / 15)
    assert k1["agree_cosine_delta_ci95"] == pytest.approx(
        [-2 / 15 - 2.7764 * math.sqrt(2 / 900), -2 / 15 + 2.7764 * math.sqrt(2 / 900)], abs=1e-4
    )
    h = 12.7062 * math.log(1.5) / 2
    assert k1["epoch_seconds_ratio"] == pytest.approx(math.sqrt(6))
    assert k1["epoch_seconds_ratio_ci95"] == pytest.approx([math.sqrt(6) / math.exp(h), math.sqrt(6) * math.exp(h)],
                                                           rel=1e-4)  # fmt: skip
    text = markdown_study(summary)
    assert "| k = 1 cached | 4 | -37.5 [" in text and "| -0.133 [-0.264, -0.002] |" in text
    assert summary["references"]["random"]["probe_top1"] == 0.25


def test_the_verdict_says_when_the_study_cannot_answer():
    good = _synthetic({"online": 0.80, "k1": 0.78, "k2": 0.80, "random": 0.50})
    assert good["verdict"] == {**good["verdict"], "valid": True, "reasons": []}
    assert "Valid:" in markdown_study(good) and "cannot answer" not in markdown_study(good)
    k1 = next(r for r in good["rows"] if r["arm"] == "k1")
    assert k1["probe_top1_delta"] == pytest.approx(-0.02) and k1["epoch_seconds_ratio"] == pytest.approx(2.0)
    bad = _synthetic({"online": 0.80, "k1": 0.52, "k2": 0.80, "random": 0.50})
    assert not bad["verdict"]["valid"] and len(bad["verdict"]["reasons"]) == 2  # probe and k-NN, k1 only
    text = markdown_study(bad)
    assert "**The study cannot answer**" in text
    assert "- k1 does not beat the random-init student on probe top-1: 0.520 [" in text
    close = _synthetic({"online": 0.80, "k1": 0.80, "k2": 0.53, "random": 0.50})  # above random, within noise
    k2 = next(r for r in close["rows"] if r["arm"] == "k2")
    assert k2["probe_top1"] > close["references"]["random"]["probe_top1"]
    assert not close["verdict"]["valid"] and all(r.startswith("k2 ") for r in close["verdict"]["reasons"])
    assert "(the intervals overlap)" in close["verdict"]["reasons"][0]
    assert "**The study cannot answer**" in markdown_study(close)


def test_ks_must_be_views_the_cache_holds():
    assert StudyViewsConfig(ks=(16, 1, 4), views=16).ks == (16, 1, 4)
    with pytest.raises(ConfigError, match="key 'ks': 32 is not in 1..views"):
        StudyViewsConfig(ks=(1, 32), views=16)
    with pytest.raises(ConfigError, match="'ks'"):
        StudyViewsConfig(ks=(2, 2))


def test_one_seed_accuracy_is_the_wilson_interval_of_kdep_eval():
    s = accuracy_over_seeds([0.76], 200)
    assert (s.low, s.high) == wilson_interval(152, 200)
    assert (round(s.low, 3), round(s.high, 3)) == (0.696, 0.814)  # README: KDEP probe 0.760 [0.696, 0.814]


def test_three_seed_accuracy_against_a_hand_computation():
    """0.80, 0.82, 0.84 on 1000 images: m = 0.82, s^2 = 0.0004, s^2/S = 1.3333e-4, e = 0.82 * 0.18 / 1000 =
    1.476e-4, V = 2.8093e-4, nu = 2 V^2 / (s^2/S)^2 = 8.879; t(0.975, 8.879) lies between the table's 2.262
    (nu = 9) and 2.306 (nu = 8)."""
    s = accuracy_over_seeds([0.80, 0.82, 0.84], 1000)
    var = 0.0004 / 3 + 0.82 * 0.18 / 1000
    assert var == pytest.approx(2.80933e-4, rel=1e-5)
    assert s.dof == pytest.approx(2 * var**2 / (0.0004 / 3) ** 2) and s.dof == pytest.approx(8.879, abs=1e-3)
    half = s.high - 0.82
    assert 2.262 * math.sqrt(var) < half < 2.306 * math.sqrt(var)
    assert s.low == pytest.approx(0.82 - half) and s.mean == pytest.approx(0.82)
    assert s.seed_sd == pytest.approx(0.02) and s.eval_se == pytest.approx(math.sqrt(0.82 * 0.18 / 1000))


def test_seed_term_alone_is_the_t_interval_over_seeds():
    """Cosine means 0.5 and 0.6 with no per-image spread: e = 0, nu = S - 1 = 1, t = 12.706 (table), half =
    12.706 * sqrt(0.005 / 2) = 0.6353; the upper end is clipped to 1."""
    s = mean_over_seeds([0.5, 0.6], [0.0, 0.0], 100)
    assert s.dof == 1.0
    assert s.low == pytest.approx(0.55 - 12.7062 * 0.05, abs=1e-4) and s.high == 1.0


def test_one_seed_mean_is_the_normal_interval():
    s = mean_over_seeds([0.5], [0.2], 400)  # 0.5 +- 1.96 * 0.2 / 20
    assert (s.low, s.high) == pytest.approx((0.5 - 0.0196, 0.5 + 0.0196), abs=1e-4)


def test_row_cosines_average_to_kdep_evals_cosine():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen)
    rows = row_cosines(s, t)
    assert rows.shape == (7,) and np.mean(rows) == pytest.approx(mean_cosine(s, t), abs=1e-12)
    assert rows[0] == pytest.approx(float(s[0] @ t[0] / (s[0].norm() * t[0].norm())), abs=1e-6)
