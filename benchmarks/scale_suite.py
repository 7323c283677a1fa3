"""`kdep bench --scale`: the ImageNet-scale benches, each in its own fresh interpreter, merged into one JSON.

    kdep bench --scale                                  # every scale bench in this tree
    kdep bench --scale --scale-only eval --quick        # one of them, at its small size

A scale bench is a module ``benchmarks/<file>.py`` that ``python -m benchmarks.<file> --json FILE [flags]`` runs
from the repository root: it writes one JSON object to FILE (its figures, and optionally ``checks``:
benchmarks/checks.py), then exits 0, or 1 when one of its checks failed. SCALE_BENCHES lists them with the flags
each gets; a module that is not in this tree (a branch not merged yet) is skipped with a one-line note. Each runs
in a fresh process (its own peak RSS, nothing imported before it); its stderr goes to the terminal. The merged
JSON holds each bench's figures under ``benches.<name>``, the skipped ones, the seconds each took and every check,
named ``<name>.<figure>``; a bench that ended without its JSON, or with another exit status, is a failed check
``<name>.ran``.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.checks import add_part, check, failed
from pipeline.choices import SCALE_BENCHES as NAMES

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ScaleOptions:
    """What `kdep bench` passes on to the scale benches."""

    quick: bool = False  # each bench's small size
    shards: int = 128  # the cache simulation's shards (bench_scale)
    root: str = ""  # a folder for their data (each bench gets <root>/<name>); "" = each bench's temp folder


@dataclass(frozen=True)
class ScaleBench:
    name: str  # --scale-only NAME; its key in the merged JSON
    module: str  # run as `python -m MODULE --json FILE *flags(options)`
    flags: Callable[[ScaleOptions], list[str]]


def _dir(options: ScaleOptions, name: str) -> list[str]:
    return ["--dir", str(Path(options.root) / name)] if options.root else []


SCALE_BENCHES = (
    ScaleBench("cache", "benchmarks.bench_scale",
               lambda o: ["--shards", str(min(o.shards, 8) if o.quick else o.shards), *_dir(o, "cache")]),
    ScaleBench("eval", "benchmarks.bench_eval", lambda o: ["--quick"] if o.quick else []),
    ScaleBench("make-shards", "benchmarks.bench_make_shards",
               lambda o: [*(["--sizes", "100", "300"] if o.quick else []), *_dir(o, "make-shards")]),
    ScaleBench("startup", "benchmarks.bench_startup",
               lambda o: ["--shards", "128" if o.quick else "128,1282", *_dir(o, "startup")]),
    ScaleBench("neighbours", "benchmarks.bench_neighbours",
               lambda o: [*(["--quick"] if o.quick else []), *_dir(o, "neighbours")]),
)  # fmt: skip


def module_file(module: str) -> Path:
    """benchmarks.bench_x -> REPO/benchmarks/bench_x.py. Presence is this file, not an import: with the project
    installed in editable mode from another checkout, its finder would supply a module this tree lacks."""
    return REPO.joinpath(*module.split(".")).with_suffix(".py")


def run_one(bench: ScaleBench, options: ScaleOptions, tmp: Path) -> tuple[dict | None, int, float]:
    """Run one bench in a fresh interpreter: (its JSON or None, exit status, seconds)."""
    out = tmp / f"{bench.name}.json"
    cmd = [sys.executable, "-m", bench.module, "--json", str(out), *bench.flags(options)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    print(f"bench --scale: {bench.name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return (json.loads(out.read_text()) if out.is_file() else None), proc.returncode, seconds


def run_scale_suite(options: ScaleOptions, only: tuple[str, ...] = ()) -> dict:
    """Run the chosen scale benches (all when ``only`` is empty) and merge their results."""
    results: dict = {"scale": True, "quick": options.quick, "machine": machine(), "benches": {}, "skipped": {},
                     "seconds": {}, "exit_status": {}, "checks": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kdep-scale-suite-") as tmp:
        for bench in SCALE_BENCHES:
            if only and bench.name not in only:
                continue
            if not module_file(bench.module).is_file():
                note = f"{module_file(bench.module).relative_to(REPO)} is not in this tree"
                print(f"bench --scale: {bench.name} skipped: {note}", file=sys.stderr, flush=True)
                results["skipped"][bench.name] = note
                continue
            figures, status, seconds = run_one(bench, options, Path(tmp))
            results["seconds"][bench.name], results["exit_status"][bench.name] = round(seconds, 1), status
            ended = figures is not None and (status == 0 or bool(failed(figures)))
            about = (f"`python -m {bench.module}` wrote its JSON and exited 0, or 1 for a failed check (exit status "
                     f"{status}, JSON {'written' if figures is not None else 'missing'})")  # fmt: skip
            results["checks"].append(check(f"{bench.name}.ran", ended, True, about, "=="))
            if figures is not None:
                results["benches"][bench.name] = {k: v for k, v in figures.items() if k != "checks"}
                add_part(results, {"checks": figures.get("checks", [])}, prefix=f"{bench.name}.")
    return results


def machine() -> dict:
    return {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}  # fmt: skip


def assert_names_match() -> None:
    """pipeline.choices.SCALE_BENCHES (what --scale-only accepts) names exactly the benches listed here."""
    if tuple(b.name for b in SCALE_BENCHES) != NAMES:
        raise RuntimeError(f"pipeline.choices.SCALE_BENCHES {NAMES} != {[b.name for b in SCALE_BENCHES]}")


assert_names_match()
