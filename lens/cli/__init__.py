"""``lens <command> [--config FILE] [key=value ...]`` (also ``python -m lens``): the one command line.

Every command reads a typed schema from ``lens.config``: defaults, then the YAML file, then the
``key=value`` overrides, checked (keys, types, choices, ranges) before anything heavy is imported
or loaded. An expected error (a bad key or value, a missing file, an artifact made for another
model) prints one line and exits 2; ``--debug`` shows its traceback. Unexpected errors keep theirs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
import typing
from dataclasses import fields, is_dataclass
from typing import Any, Mapping

from lens.cli.commands import COMMANDS, Command
from lens.config import LensError, field_docs, load_config

EXPECTED = (LensError, FileNotFoundError, FileExistsError)
"""Errors that are about the user's input, not a bug: printed as one line."""


def describe_type(tp: Any) -> str:
    """A field's type as the help shows it: choices for Literals, ``X or null`` for Optionals."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        return f"{describe_type(next(a for a in args if a is not type(None)))} or null"
    if typing.get_origin(tp) is list:
        return f"list of {describe_type(args[0])}"
    if is_dataclass(tp):
        return f"section of keys {tp.__name__}"
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def section_type(tp: Any) -> tuple[type | None, str]:
    """The schema a field nests (itself, optional, or a list of them) and how its keys are written."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if is_dataclass(tp):
        return tp, "."
    if typing.get_origin(tp) is typing.Union and len(args) == 1 and is_dataclass(args[0]):
        return args[0], "."
    if typing.get_origin(tp) is list and args and is_dataclass(args[0]):
        return args[0], "[i]."
    return None, ""


def key_lines(schema: type, prefix: str = "") -> list[str]:
    """Every key of ``schema`` (nested sections flattened to ``a.b``, list items to ``a[i].b``) with
    type, default and docstring."""
    docs, hints, lines = field_docs(schema), typing.get_type_hints(schema), []
    defaults = schema()
    for f in fields(schema):
        value = getattr(defaults, f.name)
        nested, joint = section_type(hints[f.name])
        if nested is not None and joint == "." and value is not None:
            lines += key_lines(nested, f"{prefix}{f.name}.")
            continue
        lines.append(f"  {prefix}{f.name}  ({describe_type(hints[f.name])}; default {value!r})")
        lines += [f"      {line}" for line in docs[f.name].splitlines()]
        if nested is not None:  # an optional section or a list of them: their keys too
            lines += key_lines(nested, f"{prefix}{f.name}{joint}")
    return lines


def command_help(command: Command) -> str:
    schemas: Mapping[str, type] = command.schema if isinstance(command.schema, Mapping) else {"": command.schema}
    parts = []
    for kind, schema in schemas.items():
        title = f"keys for kind={kind}" if kind else "keys"
        positional = getattr(schema, "POSITIONAL", ())
        if positional:
            title += f" (the first {len(positional)} may be given bare, in order: {' '.join(positional).upper()})"
        parts.append(f"{(schema.__doc__ or '').strip()}\n\n{title}:\n" + "\n".join(key_lines(schema)))
    return "\n\n".join(parts)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="lens",
        description="Tuned lenses and other translators for transformer LMs; steering and layer surgery read through them.",
        epilog="`lens <command> --help` lists every key of that command with its type, default and meaning.",
    )
    sub = top.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(
            name, help=command.summary, description=command.summary, epilog=command_help(command),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", metavar="FILE", help="YAML file (see configs/); defaults apply without one")
        p.add_argument("--debug", action="store_true", help="show the traceback of expected errors too")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. optim.num_steps=10 data.seq_len=64")
    return top


def with_positional(schema: type | Mapping[str, type], overrides: list[str]) -> list[str]:
    """Bare words become ``key=value`` for the schema's ``POSITIONAL`` keys, in order."""
    names = list(getattr(schema, "POSITIONAL", ()))
    out = []
    for item in overrides:
        if "=" not in item and names:
            item = f"{names.pop(0)}={item}"
        out.append(item)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    command = COMMANDS[args.command]
    run_dir: Path | None = None
    try:
        cfg = load_config(command.schema, args.config, with_positional(command.schema, args.overrides))
        run_dir = getattr(cfg, "run_dir", None)
        existed = run_dir is not None and run_dir.exists()
        outcome = command.runner(cfg)(cfg)
    except EXPECTED as err:
        if run_dir is not None and not existed and run_dir.exists():
            shutil.rmtree(run_dir)  # a run that failed on bad input leaves nothing half-made behind
        if args.debug:
            raise
        print(f"lens {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for line in outcome.lines():
        print(line)
    print(f"wrote {outcome.run_dir}")
