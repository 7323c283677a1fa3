"""The `kdep` command: every stage as a sub-command (`kdep --help` lists them)."""

from __future__ import annotations

import typer

from stages import cache_teacher, demo_data, evaluate, inspect_cache, make_shards

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="kdep-cache: cache a frozen teacher's features once, fit projections, train many students from the cache.",
)
app.command("demo-data")(demo_data.command)
app.command("make-shards")(make_shards.command)
app.command("cache-teacher")(cache_teacher.command)
app.command("inspect")(inspect_cache.inspect_command)
app.command("verify")(inspect_cache.verify_command)
app.command("eval")(evaluate.command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
