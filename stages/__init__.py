"""Entry points: one thin module per stage, each with ``run(config)`` and a typer command."""
