"""Entry points: one thin module per command, each with ``run(config)`` and ``report(config, result)``; the configs
are in ``stages/config.py`` and ``stages/cli.py`` makes the `kdep` commands and their flags from them."""
