"""The import rule of the library, checked on the source: a stage package imports only `pipeline/data`, the shared
top-level modules and an earlier stage's artefact modules; `data` and the shared modules import no stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "pipeline"
SHARED = {"errors", "manifest", "provenance", "models", "runtime", "failures", "files", "progress", "choices", "teachers", "dtypes"}  # fmt: skip
SHARED_PACKAGES = {"models"}  # shared modules that are packages: models and its library back-ends
STAGES = ("cache", "projection", "student", "process", "evaluation", "demo")
ARTEFACTS = {
    "cache": {"pipeline.cache.store", "pipeline.cache.join"},
    "projection": {"pipeline.projection.artefact"},
    # the training-view schedule: DistPro's search reads views the way stage 3 does
    "student": {"pipeline.student.pairs"},
}
EARLIER = {"cache": (), "projection": ("cache",), "student": ("cache", "projection"),
           "process": ("cache", "projection", "student"), "evaluation": ("cache", "projection"), "demo": ()}  # fmt: skip


def _pipeline_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("pipeline"))
    return names


def _allowed(package: str | None, module: str) -> bool:
    parts = module.split(".")
    if module == "pipeline" or (len(parts) == 2 and parts[1] in SHARED) or parts[1] in SHARED_PACKAGES:
        return True
    if parts[1] == "data":
        return True
    if package is None or package == "data":
        return False
    if parts[1] == package:
        return True
    return any(module in ARTEFACTS.get(stage, ()) for stage in EARLIER[package])


MODULES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(ROOT)) for p in MODULES])
def test_module_follows_the_import_rule(path):
    rel = path.relative_to(ROOT)
    package = rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] not in SHARED_PACKAGES else None
    bad = sorted(m for m in _pipeline_imports(path) if not _allowed(package, m))
    assert not bad, (
        f"pipeline/{rel} imports {bad}: outside its stage, data/, the shared modules or an artefact module"
    )


def test_layout_has_one_package_per_stage():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages == {"data", *STAGES, *SHARED_PACKAGES}
    top = {p.stem for p in ROOT.glob("*.py")} - {"__init__"}
    assert top == SHARED - SHARED_PACKAGES
