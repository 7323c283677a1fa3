"""The `kdep` command line against the configs it is generated from: every field is a flag with its comment as
help, flags sit between the manifest and --set, `--help` loads no heavy library, and progress in a log is lines."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pipeline.demo.shards import CLASS_NAMES
from pipeline.manifest import ConfigError, field_docs
from pipeline.progress import LineBar
from stages.cli import COMMANDS, _flag_values, app
from stages.config import DEMO_CLASSES, DemoDataConfig, FitSvdConfig

runner = CliRunner()


@pytest.mark.parametrize("command", COMMANDS, ids=[c.name for c in COMMANDS])
def test_every_config_field_is_a_flag_with_its_comment_as_help(command):
    result = runner.invoke(app, [command.name, "--help"], terminal_width=400, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    docs = field_docs(command.config)
    for f in dataclasses.fields(command.config):
        flag = "--" + f.name.replace("_", "-")
        assert flag in result.output, f"{command.name}: no {flag}"
        assert f.name in docs and docs[f.name].split(";")[0][:30] in result.output
    for name, choices in getattr(command.config, "CHOICES", {}).items():
        assert ", ".join(choices) in result.output, f"{command.name}: choices of {name} not listed"


def test_field_docs_reads_each_fields_comment():
    docs = field_docs(FitSvdConfig)
    assert docs["dim"].startswith("D_s, the student feature width")
    assert set(docs) == {f.name for f in dataclasses.fields(FitSvdConfig)}


def test_cli_imports_no_heavy_library():
    code = "import sys, stages.cli; print([m for m in ('torch', 'torchvision', 'zarr', 'dask', 'sklearn', 'matplotlib') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_manifest_then_flags_then_set(tmp_path):
    manifest = tmp_path / "m.yaml"
    out = tmp_path / "data"
    manifest.write_text(
        f"demo_data:\n  out: {out}\n  classes: 2\n  train_per_class: 2\n  val_per_class: 1\n  seed: 1\n  per_shard: 9\n"
    )
    args = [
        "demo-data",
        "--manifest",
        str(manifest),
        "--seed",
        "2",
        "--per-shard",
        "3",
        "--set",
        "demo_data.per_shard=4",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    written = json.loads((out / "config.demo_data.json").read_text())["config"]
    assert (written["classes"], written["seed"], written["per_shard"]) == (2, 2, 4)


def test_config_errors_are_one_line_and_name_the_key(tmp_path):
    result = runner.invoke(app, ["demo-data", "--out", str(tmp_path), "--classes", "99"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "key 'classes': value 99 is out of range [1, 10]" in result.output
    assert DEMO_CLASSES == len(CLASS_NAMES)
    with pytest.raises(ConfigError):
        DemoDataConfig(classes=len(CLASS_NAMES) + 1)


def test_positional_and_flag_must_agree(tmp_path):
    result = runner.invoke(app, ["fit-svd", "a.zarr", "--cache", "b.zarr", "--dim", "3", "--out", "p.npz"])
    assert result.exit_code == 1 and "differ" in result.output


def test_list_flags_repeat_or_take_commas():
    fit = next(c for c in COMMANDS if c.name == "fit-svd")
    assert _flag_values(fit, {"views": ["0,2", "5"], "dim": 3, "out": None})["views"] == (0, 2, 5)
    teacher = next(c for c in COMMANDS if c.name == "cache-teacher")
    assert _flag_values(teacher, {"taps": ["pre_relu", "post_relu"]})["taps"] == ("pre_relu", "post_relu")


def test_progress_in_a_log_is_whole_lines(monkeypatch):
    monkeypatch.setenv("KDEP_PROGRESS_SECONDS", "0")
    log = io.StringIO()
    with LineBar(total=50, desc="epoch 1/2", unit="img", file=log) as bar:
        for i in range(50):
            bar.update(1)
            bar.set_postfix(loss=1.0 / (i + 1))
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    assert text.splitlines()[-1].startswith("epoch 1/2: 50/50 img (100%)") and "loss=0.02" in text


def test_choices_name_what_the_library_implements():
    from pipeline.choices import VIEW_RECIPES
    from pipeline.data.views import RECIPES

    assert tuple(RECIPES) == VIEW_RECIPES
