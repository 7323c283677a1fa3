"""Manifest loading is strict: unknown/duplicate keys, wrong types and bad values are errors naming key and file."""

from __future__ import annotations

import pytest

from pipeline.manifest import ConfigError, load_manifest, resolve_config
from stages.demo_data import DemoDataConfig
from stages.make_shards import MakeShardsConfig


def _write(tmp_path, text):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


def test_values_flags_and_sets_layer_in_order(tmp_path):
    path = _write(tmp_path, "demo_data:\n  seed: 5\n  classes: 4\n  out: a\n")
    cfg = resolve_config(DemoDataConfig, "demo_data", path, {"classes": 6, "out": None}, ["demo_data.out=b"])
    assert (cfg.seed, cfg.classes, cfg.out) == (5, 6, "b")
    assert cfg.per_shard == DemoDataConfig().per_shard


def test_unknown_key_names_key_and_file(tmp_path):
    path = _write(tmp_path, "demo_data:\n  sed: 5\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: section 'demo_data': unknown key 'sed'"):
        resolve_config(DemoDataConfig, "demo_data", path)


def test_unknown_section_is_an_error(tmp_path):
    path = _write(tmp_path, "demo_dat:\n  seed: 5\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: unknown section 'demo_dat'"):
        load_manifest(path)


def test_duplicate_key_names_both_lines(tmp_path):
    path = _write(tmp_path, "demo_data:\n  seed: 5\n  seed: 6\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: duplicate key 'seed' at line 3 \(first at line 2\)"):
        load_manifest(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("demo_data:\n  seed: five\n", r"key 'seed': expected an integer, got 'five'"),
        ("demo_data:\n  seed: 1.5\n", r"key 'seed': expected an integer, got 1.5"),
        ("demo_data:\n  seed: true\n", r"key 'seed': expected an integer, got True"),
        ("demo_data:\n  out: 3\n", r"key 'out': expected a string, got 3"),
    ],
)
def test_wrong_type_names_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(DemoDataConfig, "demo_data", _write(tmp_path, text))


def test_out_of_range_value_names_key_value_and_range(tmp_path):
    path = _write(tmp_path, "demo_data:\n  classes: 0\n")
    with pytest.raises(
        ConfigError, match=r"m\.yaml: section 'demo_data': key 'classes': value 0 is out of range \[1, 10\]"
    ):
        resolve_config(DemoDataConfig, "demo_data", path)


def test_open_interval_and_required_keys():
    with pytest.raises(ConfigError, match=r"key 'fraction': value 0.0 is out of range \(0.0, 1.0\]"):
        resolve_config(
            MakeShardsConfig, "make_shards", None, {"from_folder": "a", "out": "b", "fraction": 0.0}
        )
    with pytest.raises(ConfigError, match="'from_folder' and 'out' are required"):
        resolve_config(MakeShardsConfig, "make_shards", None, {})


def test_bad_set_syntax_and_other_section():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        resolve_config(DemoDataConfig, "demo_data", None, None, ["seed=3"])
    with pytest.raises(ConfigError, match="this stage reads section 'demo_data', not 'fit_svd'"):
        resolve_config(DemoDataConfig, "demo_data", None, None, ["fit_svd.dim=3"])


def test_missing_manifest_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no manifest at"):
        load_manifest(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_manifest(_write(tmp_path, "demo_data: [\n"))


def test_checked_in_manifests_load(request):
    from pathlib import Path

    root = Path(request.config.rootpath)
    for path in sorted((root / "manifests").glob("*.yaml")):
        assert load_manifest(path), path
