"""What every stage's ``run`` shares: the resolved-config file written next to its output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.files import write_json_atomic
from pipeline.manifest import config_to_dict


def write_resolved_config(out_dir: str | Path, section: str, config: Any, extra: dict | None = None) -> Path:
    """Write ``<out_dir>/config.<section>.json``: the values the stage ran with, after all overrides."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"config.{section}.json"
    write_json_atomic(path, {"section": section, "config": config_to_dict(config), **(extra or {})})
    return path
