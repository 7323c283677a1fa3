"""What every stage's command shares: one-line errors, resolved-config files, manifest defaults."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from pipeline.data.shards import write_json_atomic
from pipeline.errors import KdepError
from pipeline.manifest import config_to_dict

DEMO_MANIFEST = "manifests/demo.yaml"
MANIFEST_HELP = "Manifest YAML; its section for this stage gives the defaults that flags override."
SET_HELP = "Override a manifest value: --set section.key=value (repeatable)."


def one_line_errors(fn: Callable) -> Callable:
    """Turn user errors (KdepError) into 'error: ...' on stderr and exit 1; KDEP_DEBUG=1 shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KdepError as err:
            if os.environ.get("KDEP_DEBUG"):
                raise
            typer.echo(f"error: {user_message(err)}", err=True)
            sys.exit(1)

    return wrapper


def user_message(err: BaseException) -> str:
    """The one-line message of a user error, also when a DataLoader worker raised it (torch re-raises it in the
    main process with the worker's traceback prepended; the last line is the original message)."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return (
        last.split(": ", 1)[1]
        if ": " in last and last.split(": ", 1)[0].endswith(type(err).__name__)
        else last
    )


def write_resolved_config(out_dir: str | Path, section: str, config: Any, extra: dict | None = None) -> Path:
    """Write ``<out_dir>/config.<section>.json``: the values the stage ran with, after all overrides."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"config.{section}.json"
    write_json_atomic(path, {"section": section, "config": config_to_dict(config), **(extra or {})})
    return path


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=1, default=str))
