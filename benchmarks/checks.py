"""Agreement checks: every benchmark figure that compares with a reference is checked against its tolerance where it
is computed, so a regression cannot hide in a JSON file (``svd_max_subspace_error_vs_numpy`` read 0.10 for weeks).

    check("svd_max_subspace_error_vs_numpy", 4.6e-8, 1e-5, "fit-svd vs numpy.linalg.svd on the valid rows")

A figure out of tolerance prints one loud line on stderr at once (``FAIL <figure> = <value> (tolerance ...): ...``);
each check is a record in the results' ``checks`` list; ``kdep bench`` and each bench script write their JSON, then
exit 1 when any check failed (``exit_status``).
"""

from __future__ import annotations

import math
import sys

RELATIONS = ("<=", "==")  # value at most the tolerance (NaN fails), or exactly equal to the reference


def check(
    figure: str, value: float | int | bool, tolerance: float | int | bool, about: str, relation: str = "<="
) -> dict:
    """Record one agreement figure against its tolerance; print the FAIL line when it is out of tolerance."""
    if relation not in RELATIONS:
        raise ValueError(f"relation {relation!r} is not one of {RELATIONS}")
    if relation == "==":
        passed = value == tolerance
    else:
        passed = value is not None and not math.isnan(float(value)) and float(value) <= float(tolerance)
    record = {"figure": figure, "value": value, "relation": relation, "tolerance": tolerance,
              "passed": bool(passed), "about": about}  # fmt: skip
    if not passed:
        print(fail_line(record), file=sys.stderr, flush=True)
    return record


def fail_line(record: dict) -> str:
    """``FAIL svd_max_subspace_error_vs_numpy = 0.1004 (tolerance <= 1e-05): fit-svd vs numpy ...``"""
    value = record["value"]
    shown = f"{value:.4g}" if isinstance(value, float) else repr(value)
    return (
        f"FAIL {record['figure']} = {shown} (tolerance {record['relation']} {record['tolerance']!r}): "
        f"{record['about']}"
    )


def add_part(results: dict, part: dict, prefix: str = "") -> dict:
    """Merge a bench's figures into ``results``, appending its checks (figures named ``prefix`` + figure)."""
    part = dict(part)
    checks = [{**c, "figure": prefix + c["figure"]} for c in part.pop("checks", [])]
    results.update(part)
    results.setdefault("checks", []).extend(checks)
    return results


def failed(results: dict) -> list[dict]:
    return [c for c in results.get("checks", []) if not c["passed"]]


def exit_status(results: dict) -> int:
    """0 when every recorded check passed (or none was made), else 1; repeats the FAIL lines as a summary."""
    bad = failed(results)
    for record in bad:
        print(fail_line(record), file=sys.stderr)
    if bad:
        print(f"bench: {len(bad)} of {len(results['checks'])} agreement checks failed", file=sys.stderr)
    return 1 if bad else 0
