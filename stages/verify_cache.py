"""`kdep verify`: proof that a cache's numbers can be recomputed from its metadata and the source shards.

    kdep verify out/demo/cache --samples 16
    kdep verify out/demo/cache --shards /new/place/of/the/shards

Rebuilds the recorded teacher from the store's metadata alone, recomputes N random (key, view) features from the
source shards and exits 1 when the error is above tolerance. Reads the store and the shards; writes nothing.
"""

from __future__ import annotations

import typer

from pipeline.cache.store import open_store
from pipeline.cache.verify import VerifyReport, verify_store
from stages.config import VerifyConfig


def run(config: VerifyConfig) -> VerifyReport:
    return verify_store(
        open_store(config.store), config.samples, config.seed, config.tolerance, config.shards
    )


def report(config: VerifyConfig, report: VerifyReport) -> None:
    typer.echo(
        f"verified {report.pairs} (key, view) pairs: max abs error {report.max_abs_error:.3g}, "
        f"max rel error {report.max_rel_error:.3g} (tolerance {report.tolerance:.3g}; worst: {report.worst})"
    )
    if not report.ok:
        typer.echo("error: cached features do not match the recomputation", err=True)
        raise typer.Exit(1)
