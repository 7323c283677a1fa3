"""`kdep study views`: the whole study on tiny data through the CLI (every step, every table column, reuse on a
re-run, refusal of changed settings), and its 95% intervals against hand computations of the documented formula
(Wilson for one seed; mean +- t_nu sqrt(s^2/S + e) with Welch-Satterthwaite nu for several)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.evaluation.intervals import wilson_interval
from pipeline.evaluation.probes import mean_cosine
from pipeline.evaluation.seed_intervals import accuracy_over_seeds, mean_over_seeds
from pipeline.manifest import ConfigError
from stages.cli import app
from stages.config import StudyViewsConfig
from studies.views_table import CSV_COLUMNS, METRICS

runner = CliRunner()


def _manifest(tmp_path):
    """Two k values (1 and E = 2: the issue's one epoch cannot hold two), one seed, 4 classes x 6 train / 3 val."""
    path = tmp_path / "study.yaml"
    path.write_text(f"""
study: {{out: {tmp_path / "study"}, ks: [1, 4], seeds: 1, epochs: 2, classes: 4, train_per_class: 6,
        val_per_class: 3, per_shard: 8, min_side: 32, max_side: 64, resolution: 32, teacher_epochs: 1,
        batch_size: 8, knn_k: 3, agreement_images: 0, workers: 0, device: cpu, quiet: true, threads: 1}}
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
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [int(r["k"]) for r in rows] == [1, 2]  # 4 > E dropped, E = 2 added
    for row in rows:
        assert all(math.isfinite(float(v)) for v in row.values()), row
        for m in METRICS:
            assert float(row[f"{m}_low"]) <= float(row[m]) <= float(row[f"{m}_high"])
    assert float(rows[-1]["probe_top1_delta"]) == 0.0
    summary = json.loads((out / "study.json").read_text())
    assert [(r["k"], r["seed"]) for r in summary["runs"]] == [(1, 0), (2, 0)]
    assert summary["data"]["val_samples"] == 12 and summary["data"]["agreement_images"] == 12
    provenance = json.loads((out / "students" / "k1-s0" / "provenance.json").read_text())
    assert json.dumps(provenance).count('"views_used": 1') >= 1
    table = (out / "study.md").read_text()
    for label in (
        *METRICS.values(),
        "2 (fresh view every epoch)",
        "teacher (labelled, reference)",
        "random-init student (reference)",
    ):
        assert label in table
    assert (out / "study.png").stat().st_size > 0
    # A re-run reuses every student; settings that changed an artefact are refused before anything runs.
    stamp = (out / "students" / "k1-s0" / "done.json").stat().st_mtime_ns
    again = runner.invoke(app, ["study-views", "--manifest", str(manifest), "--knn-k", "2"])
    assert again.exit_code == 0, again.output
    assert (out / "students" / "k1-s0" / "done.json").stat().st_mtime_ns == stamp
    changed = runner.invoke(app, ["study-views", "--manifest", str(manifest), "--set", "study.lr=0.2"])
    assert changed.exit_code == 1 and "lr: 0.1 -> 0.2" in changed.output


def test_ks_keep_values_up_to_epochs_and_add_epochs():
    assert StudyViewsConfig(ks=(16, 1, 4, 32, 2), epochs=16).study_ks == (1, 2, 4, 16)
    assert StudyViewsConfig(ks=(1, 2), epochs=20).study_ks == (1, 2, 20)
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
    from studies.common import row_cosines

    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen)
    rows = row_cosines(s, t)
    assert rows.shape == (7,) and np.mean(rows) == pytest.approx(mean_cosine(s, t), abs=1e-12)
    assert rows[0] == pytest.approx(float(s[0] @ t[0] / (s[0].norm() * t[0].norm())), abs=1e-6)
