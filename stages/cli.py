"""The `kdep` command: every stage as a sub-command (`kdep --help` lists them)."""

from __future__ import annotations

import typer

from stages import (
    bench,
    cache_teacher,
    demo,
    demo_data,
    evaluate,
    fit_svd,
    inspect_cache,
    make_shards,
    train_student,
)

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="kdep-cache: cache a frozen teacher's features once, fit projections, train many students from the cache.",
)
app.command("demo")(demo.command)
app.command("demo-data")(demo_data.command)
app.command("make-shards")(make_shards.command)
app.command("cache-teacher")(cache_teacher.command)
app.command("fit-svd")(fit_svd.command)
app.command("train-student")(train_student.command)
app.command("inspect")(inspect_cache.inspect_command)
app.command("verify")(inspect_cache.verify_command)
app.command("eval")(evaluate.command)
app.command("bench")(bench.command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
