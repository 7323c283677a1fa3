"""The benchmarks' agreement checks and the scale suite's wiring.

- ``check``: a figure within its tolerance passes silently, one out of it (or NaN, or unequal) prints one FAIL line
  naming the figure, the value and the tolerance; ``exit_status`` is 1 when any check failed;
- `kdep bench` writes its JSON (which records the checks) and then exits 1 when a check failed, 0 otherwise;
- the SVD bench's numpy reference reads the valid rows: on a cache whose slot has padding rows the figure is at
  float32 precision, and the old reference (every row, padding included) is caught: FAIL lines, exit status 1;
- `kdep bench --scale`: each scale bench in its own interpreter, merged into one JSON; a module missing from the tree
  is skipped with a note, a bench that fails a check or dies without its JSON fails the run, --scale-only picks;
  each registered module present in this tree accepts `--json` and the flags the suite gives it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import benchmarks.bench_svd as bench_svd
import benchmarks.scale_suite as suite
from benchmarks.checks import check, exit_status, fail_line
from pipeline.cache.store import open_store
from stages.cli import app

REPO = Path(__file__).resolve().parents[1]


def test_check_passes_within_tolerance_and_prints_one_fail_line_outside(capsys):
    ok = check("svd_max_subspace_error_vs_numpy", 4.6e-8, 1e-5, "fit vs numpy")
    assert ok["passed"] and capsys.readouterr().err == ""
    bad = check("svd_max_subspace_error_vs_numpy", 0.10038, 1e-5, "fit vs numpy")
    line = capsys.readouterr().err.strip()
    assert (
        not bad["passed"]
        and line == "FAIL svd_max_subspace_error_vs_numpy = 0.1004 (tolerance <= 1e-05): fit vs numpy"
    )
    assert line == fail_line(bad) and len(line.splitlines()) == 1
    assert not check("x", math.nan, 1.0, "NaN is never within tolerance")["passed"]
    assert (
        check("rows", 5000, 5000, "equal", "==")["passed"]
        and not check("rows", 5120, 5000, "equal", "==")["passed"]
    )
    assert not check("same", False, True, "bit for bit", "==")["passed"]
    assert exit_status({"checks": [ok]}) == 0 and exit_status({}) == 0
    capsys.readouterr()
    assert exit_status({"checks": [ok, bad]}) == 1
    assert "bench: 1 of 2 agreement checks failed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="relation"):
        check("x", 1, 1, "", ">=")


@pytest.mark.parametrize("value,code", [(4.6e-8, 0), (0.1, 1)])
def test_kdep_bench_writes_its_json_then_exits_1_when_a_check_failed(tmp_path, monkeypatch, value, code):
    import stages.bench as stage

    def fake_run_bench(device: str, quick: bool, out_dir: str) -> dict:
        results = {"checks": [check("svd_max_subspace_error_vs_numpy", value, 1e-5, "fit vs numpy")]}
        path = Path(out_dir) / "bench.json"
        path.write_text(json.dumps(results))
        return {**results, "written": str(path)}

    monkeypatch.setattr(stage, "run_bench", fake_run_bench)
    result = CliRunner().invoke(app, ["bench", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == code, result.output
    recorded = json.loads((tmp_path / "bench.json").read_text())["checks"]
    assert recorded[0]["figure"] == "svd_max_subspace_error_vs_numpy" and recorded[0]["passed"] == (code == 0)
    assert ("FAIL svd_max_subspace_error_vs_numpy = 0.1 (tolerance <= 1e-05)" in result.output) == bool(code)


def test_svd_bench_compares_on_the_valid_rows_and_catches_the_padded_reference(monkeypatch, capsys):
    """600 rows x 256: a slot of 768 rows (whole inner chunks of 256), 168 of them zero padding."""
    rows, dim = 600, 256
    good = bench_svd.bench_svd(rows=(rows,), dim=dim)
    assert good["svd_rows"] == {rows: {"fit": rows, "numpy": rows}}
    assert good["svd_max_subspace_error_vs_numpy"] < 1e-6 and exit_status(good) == 0
    assert {c["figure"] for c in good["checks"]} >= {
        "svd_max_subspace_error_vs_numpy",
        f"svd_numpy_rows_{rows}",
    }

    def every_row(cache: Path, dim_s: int):  # the reference before the fix: padding rows read as features
        x = open_store(cache).feature_array("pre_relu")[:][:, 0, :].astype(np.float32)
        _, s, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
        return 0.0, vt[:dim_s].T, s, len(x)

    monkeypatch.setattr(bench_svd, "numpy_reference", every_row)
    capsys.readouterr()
    bad = bench_svd.bench_svd(rows=(rows,), dim=dim)
    err = capsys.readouterr().err
    assert bad["svd_max_subspace_error_vs_numpy"] > 1e-3 and exit_status(bad) == 1
    assert f"FAIL svd_numpy_rows_{rows} = 768 (tolerance == {rows})" in err
    assert "FAIL svd_max_subspace_error_vs_numpy = " in err


FAKE_BENCHES = {
    "bench_ok": """
        args = sys.argv
        out = args[args.index("--json") + 1]
        json.dump({"figure": 1.0, "flags": args[1:], "checks": [
            {"figure": "agree", "value": 0.0, "relation": "<=", "tolerance": 1e-6, "passed": True, "about": ""}]},
            open(out, "w"))
    """,
    "bench_fail": """
        out = sys.argv[sys.argv.index("--json") + 1]
        json.dump({"checks": [{"figure": "agree", "value": 0.5, "relation": "<=", "tolerance": 1e-6,
                               "passed": False, "about": "a reference"}]}, open(out, "w"))
        sys.exit(1)
    """,
    "bench_crash": """
        raise RuntimeError("died before its JSON")
    """,
}


@pytest.fixture
def fake_tree(tmp_path, monkeypatch) -> Path:
    """A tree whose benchmarks/ holds three fake scale benches (the fourth registered one is missing)."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    for name, body in FAKE_BENCHES.items():
        (tmp_path / "benchmarks" / f"{name}.py").write_text("import json, sys\n" + textwrap.dedent(body))
    monkeypatch.setattr(suite, "REPO", tmp_path)
    monkeypatch.setattr(suite, "SCALE_BENCHES", (
        suite.ScaleBench("cache", "benchmarks.bench_ok", lambda o: ["--shards", str(o.shards)]),
        suite.ScaleBench("eval", "benchmarks.bench_fail", lambda o: []),
        suite.ScaleBench("make-shards", "benchmarks.bench_crash", lambda o: []),
        suite.ScaleBench("startup", "benchmarks.bench_missing", lambda o: []),
    ))  # fmt: skip
    return tmp_path


def test_scale_suite_merges_skips_and_fails(fake_tree, tmp_path, capfd):
    merged = suite.run_scale_suite(suite.ScaleOptions(shards=7))
    err = capfd.readouterr().err
    assert merged["skipped"] == {"startup": "benchmarks/bench_missing.py is not in this tree"}
    assert "bench --scale: startup skipped: benchmarks/bench_missing.py is not in this tree" in err
    assert merged["benches"]["cache"]["flags"][-2:] == ["--shards", "7"] and set(merged["benches"]) == {
        "cache",
        "eval",
    }
    assert merged["exit_status"] == {"cache": 0, "eval": 1, "make-shards": 1}
    verdicts = {c["figure"]: c["passed"] for c in merged["checks"]}
    assert verdicts == {"cache.ran": True, "cache.agree": True, "eval.ran": True, "eval.agree": False,
                        "make-shards.ran": False}  # fmt: skip
    assert "FAIL make-shards.ran = False (tolerance == True)" in err and exit_status(merged) == 1
    only = suite.run_scale_suite(suite.ScaleOptions(), only=("cache",))
    assert set(only["benches"]) == {"cache"} and exit_status(only) == 0 and not only["skipped"]


def test_kdep_bench_scale_writes_the_merged_json_and_exits_1(fake_tree, tmp_path):
    out = tmp_path / "results"
    failing = CliRunner().invoke(app, ["bench", "--scale", "--out", str(out)])
    assert failing.exit_code == 1, failing.output
    written = json.loads(next(out.glob("*-scale.json")).read_text())
    assert not all(c["passed"] for c in written["checks"]) and "eval" in written["benches"]
    passing = CliRunner().invoke(app, ["bench", "--scale", "--scale-only", "cache", "--out", str(out)])
    assert passing.exit_code == 0, passing.output
    refused = CliRunner().invoke(app, ["bench", "--scale-only", "cache", "--out", str(out)])
    assert refused.exit_code == 1 and "give --scale with it" in refused.output
    unknown = CliRunner().invoke(app, ["bench", "--scale", "--scale-only", "nope", "--out", str(out)])
    assert unknown.exit_code == 1 and "scale_only" in unknown.output


@pytest.mark.parametrize("quick", [False, True])
def test_each_registered_scale_bench_in_this_tree_takes_its_flags(quick):
    """`python -m MODULE --help` of every registered module present here lists --json and every flag the suite
    passes it (a module merged later with other flags fails here, not in a long run)."""
    options = suite.ScaleOptions(quick=quick, shards=8, root="/tmp/x")
    present = [b for b in suite.SCALE_BENCHES if suite.module_file(b.module).is_file()]
    assert {"cache", "eval"} <= {b.name for b in present}
    for bench in present:
        done = subprocess.run([sys.executable, "-m", bench.module, "--help"], cwd=REPO, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        wanted = {"--json"} | {f for f in bench.flags(options) if f.startswith("--")}
        assert all(flag in done.stdout for flag in wanted), (bench.name, wanted)
