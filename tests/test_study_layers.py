"""`kdep study-layers`: the whole single-tap vs multi-layer study on tiny data through the CLI (every step, every
table column, the targets each arm trained with, reuse on a re-run), and its rows against the shared interval code
(``summarise_runs``, as the views study's rows)."""

from __future__ import annotations

import csv
import json
import math

import pytest
from typer.testing import CliRunner

from pipeline.manifest import ConfigError
from stages.cli import app
from stages.config import StudyLayersConfig
from studies.arm_table import CSV_COLUMNS, summarise_arms
from studies.tables import METRICS, summarise_runs

runner = CliRunner()


@pytest.mark.slow
def test_study_layers_runs_end_to_end_and_writes_every_column(tmp_path):
    manifest = tmp_path / "layers.yaml"
    manifest.write_text(f"""
study: {{out: {tmp_path / "study"}, seeds: 1, epochs: 1, views: 2, classes: 4, train_per_class: 12,
        val_per_class: 3, per_shard: 8, min_side: 32, max_side: 64, resolution: 32, teacher_epochs: 1,
        targets: [stage3=stage3, pre_relu=pre_relu], target_weights: [0.5, 1.0],
        batch_size: 8, knn_k: 3, agreement_images: 0, workers: 0, device: cpu, quiet: true, threads: 1,
        search_epochs: 1, alpha_threshold: 0.3}}
""")
    result = runner.invoke(app, ["study-layers", "--manifest", str(manifest)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "study"
    with open(out / "study.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS and [r["arm"] for r in rows] == [
        "single-tap",
        "multi-layer",
        "distpro",
    ]
    for row in rows:
        assert all(math.isfinite(float(v)) for k, v in row.items() if k != "arm"), row
    assert float(rows[0]["probe_top1_delta"]) == 0.0
    for arm, targets in (
        ("single-tap", ["pre_relu=pre_relu"]),
        ("multi-layer", ["stage3=stage3", "pre_relu=pre_relu"]),
    ):
        provenance = json.loads((out / "students" / f"{arm}-s0" / "provenance.json").read_text())
        assert [t["name"] for t in provenance["targets"]] == targets
    assert json.loads((out / "study.json").read_text())["target_weights"] == [0.5, 1.0]
    distpro = json.loads((out / "students" / "distpro-s0" / "provenance.json").read_text())
    assert distpro["process"]["alpha_threshold"] == 0.3 and (out / "process" / "alpha.png").is_file()
    table = (out / "study.md").read_text()
    for label in (
        "single-tap KDEP (pre_relu=pre_relu)",
        "multi-layer KDEP (stage3=stage3 x0.5, pre_relu=pre_relu x1)",
        "random-init student (reference)",
        "teacher (labelled, reference)",
        *METRICS.values(),
    ):
        assert label in table
    assert (out / "study.png").stat().st_size > 0 and (out / "proj-stage3-256.npz").is_file()
    stamp = (out / "students" / "multi-layer-s0" / "done.json").stat().st_mtime_ns
    again = runner.invoke(app, ["study-layers", "--manifest", str(manifest), "--knn-k", "2"])
    assert again.exit_code == 0, again.output
    assert (out / "students" / "multi-layer-s0" / "done.json").stat().st_mtime_ns == stamp


def test_arm_rows_are_the_views_studys_rows_with_a_name_and_deltas_to_the_first_arm():
    runs = {
        "single-tap": [{"probe_top1": p, "knn_top1": p - 0.1, "agree_cosine": 0.3, "agree_cosine_sd": 0.1}
                       for p in (0.70, 0.74)],
        "multi-layer": [{"probe_top1": p, "knn_top1": p - 0.1, "agree_cosine": 0.35, "agree_cosine_sd": 0.1}
                        for p in (0.72, 0.78)],
    }  # fmt: skip
    rows = summarise_arms(runs, 1000, 500)
    for row, (arm, arm_runs) in zip(rows, runs.items(), strict=True):
        reference = summarise_runs(arm_runs, 1000, 500)
        assert row["arm"] == arm and all(row[k] == v for k, v in reference.items())
    assert rows[1]["probe_top1_delta"] == pytest.approx(0.03) and rows[0]["knn_top1_delta"] == 0.0


def test_study_layers_config_names_the_bad_key():
    assert StudyLayersConfig().cache_taps == (
        "pre_relu",
        "stage2",
        "stage3",
        "stage1",
        "stage4",
    )  # + DistPro's
    assert StudyLayersConfig(distpro=False).cache_taps == ("pre_relu", "stage2", "stage3")
    with pytest.raises(ConfigError, match="key 'single': student tap 'stage9'"):
        StudyLayersConfig(single="stage9=stage2")
    with pytest.raises(ConfigError, match="key 'targets'"):
        StudyLayersConfig(targets=("pre_relu=pre_relu",))
    with pytest.raises(ConfigError, match="key 'target_weights'"):
        StudyLayersConfig(target_weights=(1.0,))
