"""The `kdep` command: every stage as a sub-command, its flags generated from the stage's config dataclass.

A field of a config in ``stages/config.py`` is written once and becomes a flag (``--field-name``; a tuple field is
repeatable, a bool is ``--x/--no-x``), with its comment as help, its choices and its default. Values apply in the
order manifest section < flags < ``--set section.key=value``. The stage module (torch, zarr, dask) is imported
only when its command runs, so ``kdep --help`` and config errors answer at once.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import typer
import yaml

from pipeline.errors import KdepError
from pipeline.manifest import ConfigError, field_docs, resolve_config
from stages import config as cfg

MANIFEST_HELP = "Manifest YAML; its section for this stage gives the defaults that flags override."
SET_HELP = "Override a manifest value: --set section.key=value (repeatable)."


@dataclass(frozen=True)
class Command:
    """One sub-command: the stage module runs ``run(config)`` then ``report(config, result)``."""

    name: str  # sub-command name
    module: str  # stage module, imported when the command runs
    config: type  # its config dataclass (stages/config.py)
    section: str | None  # manifest section it reads (None: no --manifest/--set)
    help: str  # one line for `kdep --help`
    positional: str | None = None  # a field that may also be given as the first argument
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # field -> extra flag names


COMMANDS = (
    Command("demo", "stages.demo", cfg.DemoConfig, None,
            "Run the whole pipeline on the embedded demo data (CPU, minutes); finished stages are reused.",
            aliases={"sets": ("--set",)}),
    Command("demo-data", "stages.demo_data", cfg.DemoDataConfig, "demo_data",
            "Generate the demo image set (10 classes, mixed JPEG/PNG/grayscale/CMYK) as train/val shards."),
    Command("demo-teacher", "stages.demo_teacher", cfg.DemoTeacherConfig, "demo_teacher",
            "Train the small labelled demo teacher (a stand-in for a pre-trained ImageNet teacher)."),
    Command("make-shards", "stages.make_shards", cfg.MakeShardsConfig, "make_shards",
            "Convert an ImageFolder to WebDataset shards with stable keys and a shard index."),
    Command("cache-teacher", "stages.cache_teacher", cfg.CacheTeacherConfig, "cache_teacher",
            "Run a frozen teacher once over K views per image and cache its features (resumable, torchrun-ready).",
            aliases={"taps": ("--tap",)}),
    Command("fit-svd", "stages.fit_svd", cfg.FitSvdConfig, "fit_svd",
            "Fit SVD / CS.var / CS.rand / interpolation + PTS/SN/SM from the cache: one cache, many student widths.",
            positional="cache"),
    Command("train-student", "stages.train_student", cfg.TrainStudentConfig, "train_student",
            "Train student backbones from the cache (KDEP, CoSS, cosine or parametric baselines)."),
    Command("inspect", "stages.inspect_cache", cfg.InspectConfig, "inspect",
            "Show a cache's teacher, taps, D, K, images, shards done/total and bytes per view.",
            positional="store"),
    Command("verify", "stages.verify_cache", cfg.VerifyConfig, "verify",
            "Recompute random cached features with the recorded teacher; exit 1 above tolerance.",
            positional="store"),
    Command("eval", "stages.evaluate", cfg.EvalConfig, "eval",
            "Linear probe, k-NN, optional fine-tuning and teacher agreement; one row per backbone.",
            aliases={"backbones": ("--backbone",)}),
    Command("bench", "stages.bench", cfg.BenchConfig, "bench",
            "Run every benchmark side by side; write benchmarks/results/<date>-<host>.json and a PNG."),
    Command("study-views", "stages.study_views", cfg.StudyViewsConfig, "study",
            "Is a student distilled from k cached views as good as online KD on fresh views: paired seeds, "
            "differences to online with 95% intervals, the cost ratio, a table and plot (= kdep study views)."),
    Command("study-layers", "stages.study_layers", cfg.StudyLayersConfig, "study",
            "Single-tap vs multi-layer KDEP (KDEP Table 7) vs DistPro on the demo: several seeds per arm, a "
            "random-init reference, a table and plot with 95% intervals (= kdep study layers)."),
    Command("search-process", "stages.search_process", cfg.SearchProcessConfig, "search_process",
            "DistPro: search alpha per teacher-stage -> student-stage pathway on a held-out split; write the process."),
)  # fmt: skip


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
    head, sep, tail = last.partition(": ")
    return tail if sep and head.endswith(type(err).__name__) else last


def _base_type(tp: Any) -> tuple[type, bool]:
    """(the scalar type a flag parses, whether the field is a tuple) for a config annotation."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is tuple:
        return typing.get_args(tp)[0], True
    return tp, False


def _flag_help(doc: str, choices: tuple | None, default: Any) -> str:
    text = doc
    if choices:
        text += f"; one of: {', '.join(choices)}"
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{text} (default: {shown})" if shown not in ("", None) else text


def _option(command: Command, f: dataclasses.Field, tp: Any, doc: str) -> inspect.Parameter:
    scalar, many = _base_type(tp)
    dashed = "--" + f.name.replace("_", "-")
    names = (f"{dashed}/--no-{f.name.replace('_', '-')}",) if scalar is bool else (dashed,)
    names += command.aliases.get(f.name, ())
    choices = getattr(command.config, "CHOICES", {}).get(f.name)
    help_text = _flag_help(doc, choices, f.default)
    if many and scalar in (int, float):
        help_text += " (repeat the flag or give a,b,c)"
    annotation = (
        list[str] if many else scalar
    )  # numbers in a list are parsed (and checked) by the manifest code
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
        default=typer.Option(None, *names, help=help_text, show_default=False),
    )  # fmt: skip


def _flag_values(command: Command, values: dict[str, Any]) -> dict[str, Any]:
    """Given flags -> config values: unset flags (None, empty lists) drop out; list items are YAML scalars."""
    hints = typing.get_type_hints(command.config)
    out: dict[str, Any] = {}
    for name, value in values.items():
        if value is None or value == []:
            continue
        scalar, many = _base_type(hints[name])
        if many and scalar in (int, float):
            value = [yaml.safe_load(v) for item in value for v in item.split(",") if v.strip()]
        out[name] = tuple(value) if many else value
    return out


def build_command(command: Command) -> Callable:
    """A typer callback whose parameters are the config's fields (plus the positional, --manifest and --set)."""
    hints = typing.get_type_hints(command.config)
    docs = field_docs(command.config)
    fields = [f for f in dataclasses.fields(command.config) if f.init]
    params = [_option(command, f, hints[f.name], docs.get(f.name, "")) for f in fields]
    if command.positional:
        params.insert(0, inspect.Parameter(
            "positional_", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
            default=typer.Argument(None, metavar=command.positional.upper(), show_default=False,
                                   help=f"Same as --{command.positional.replace('_', '-')}."),
        ))  # fmt: skip
    if command.section:
        params.append(
            inspect.Parameter(
                "manifest_",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=str,
                default=typer.Option(None, "--manifest", help=MANIFEST_HELP),
            )
        )
        params.append(inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, annotation=list[str],
                                        default=typer.Option(None, "--set", help=SET_HELP)))  # fmt: skip

    @one_line_errors
    def callback(positional_: str | None = None, manifest_: str | None = None, set_: list[str] | None = None,
                 **values: Any) -> None:  # fmt: skip
        if positional_ is not None:
            given = values.get(command.positional)
            if given is not None and given != positional_:
                raise ConfigError(
                    f"{command.name}: {positional_!r} and --{command.positional} {given!r} differ; give one"
                )
            values[command.positional] = positional_
        flags = _flag_values(command, values)
        config = resolve_config(command.config, command.section or command.name, manifest_, flags, set_)
        stage = importlib.import_module(command.module)
        stage.report(config, stage.run(config))

    callback.__signature__ = inspect.Signature(params)
    callback.__doc__ = command.help
    return callback


app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="kdep-cache: cache a frozen teacher's features once, fit projections, train many students from the cache.",
)
for _command in COMMANDS:
    app.command(_command.name, help=_command.help)(build_command(_command))
study_app = typer.Typer(
    no_args_is_help=True, help="Studies: many students from one cache, with 95% intervals."
)
_study_views = next(c for c in COMMANDS if c.name == "study-views")
study_app.command("views", help=_study_views.help)(build_command(_study_views))  # = kdep study-views
_study_layers = next(c for c in COMMANDS if c.name == "study-layers")
study_app.command("layers", help=_study_layers.help)(build_command(_study_layers))  # = kdep study-layers
app.add_typer(study_app, name="study")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
