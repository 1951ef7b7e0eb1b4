"""MkDocs hook: generates the job-schema and CLI reference pages at build time.

A page that holds ``<!-- generated: job-schema -->`` gets, in its place, every key of every
job task from the pydantic models in :mod:`mpcfl.jobs.schema` (type, default, constraints,
description); ``<!-- generated: cli -->`` gets every subcommand, argument and option of the
argparse parser that :mod:`mpcfl.cli` builds. Nothing here is copied by hand, so the pages
cannot go stale: they are rebuilt from the code on every ``mkdocs build``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the worktree's mpcfl, not whichever one the venv installed
    sys.path.insert(0, str(REPO))

MARKER = re.compile(r"<!--\s*generated:\s*([\w-]+)\s*-->")

# Each task's job model, in the order the page lists them.
JOB_MODELS = ("TrainJob", "InferenceJob", "FederatedJob", "PredictJob")
_CONSTRAINTS = {
    "minimum": ">= {}",
    "maximum": "<= {}",
    "exclusiveMinimum": "> {}",
    "exclusiveMaximum": "< {}",
    "minLength": "at least {} characters",
    "maxLength": "at most {} characters",
    "minItems": "at least {} items",
    "maxItems": "at most {} items",
    "pattern": "matches `{}`",
}


def _anchor(name: str) -> str:
    return name.lower()


def _models_reachable(roots: list[type]) -> dict[str, type]:
    """Every pydantic model class reachable through the fields of ``roots``, by class name."""
    from pydantic import BaseModel

    found: dict[str, type] = {}

    def visit(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation.__name__ not in found:
                found[annotation.__name__] = annotation
                for field in annotation.model_fields.values():
                    visit(field.annotation)
            return
        for arg in typing.get_args(annotation):
            visit(arg)

    for root in roots:
        visit(root)
    return found


def _type(schema: dict[str, Any]) -> str:
    """A JSON-schema node as a short type, with links to nested models' sections."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{_anchor(name)})"
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    for union in ("anyOf", "oneOf"):
        if union in schema:
            return " \\| ".join(_type(s) for s in schema[union])
    kind = schema.get("type")
    if kind == "array":
        if "prefixItems" in schema:
            return "[" + ", ".join(_type(s) for s in schema["prefixItems"]) + "]"
        return f"list of {_type(schema.get('items', {}))}" if schema.get("items") else "list"
    if kind == "object":
        extra = schema.get("additionalProperties")
        return f"map of string to {_type(extra)}" if isinstance(extra, dict) and extra else "map"
    if kind == "string" and schema.get("format") == "path":
        return "path"
    return str(kind) if kind else "any"


def _constraints(schema: dict[str, Any]) -> list[str]:
    found = [text.format(schema[key]) for key, text in _CONSTRAINTS.items() if key in schema]
    for union in ("anyOf", "oneOf"):
        for option in schema.get(union, []):
            found += _constraints(option)
    return found


def _default(prop: dict[str, Any], required: bool) -> str:
    if required:
        return "**required**"
    if "default" not in prop:
        return ""
    value = prop["default"]
    if isinstance(value, dict) and value:
        return "its keys' defaults"
    return f"`{json.dumps(value)}`"


def _escape(text: str) -> str:
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text)  # Sphinx roles in docstrings
    return text.replace("|", "\\|").replace("\n", " ")


def _model_table(name: str, schema: dict[str, Any], hidden: set[str]) -> list[str]:
    lines = [f"### {name} {{#{_anchor(name)}}}", ""]
    if schema.get("description"):
        lines += [_escape(schema["description"]), ""]
    if schema.get("additionalProperties") is False:
        lines += ["Unknown keys are errors.", ""]
    lines += ["| key | type | default | constraints | description |", "|---|---|---|---|---|"]
    required = set(schema.get("required", []))
    for key, prop in schema.get("properties", {}).items():
        if key in hidden:
            continue
        lines.append(
            f"| `{key}` | {_type(prop)} | {_default(prop, key in required)} | "
            f"{_escape(', '.join(_constraints(prop)))} | {_escape(prop.get('description', ''))} |"
        )
    return lines + [""]


def job_schema_markdown() -> str:
    """Every key of every job task, from the pydantic models of mpcfl.jobs.schema."""
    from mpcfl.jobs import schema as jobs

    roots = [getattr(jobs, name) for name in JOB_MODELS]
    classes = _models_reachable(roots)
    defs: dict[str, dict[str, Any]] = {}
    tops: list[tuple[str, dict[str, Any]]] = []
    for root in roots:
        full = root.model_json_schema()
        for name, sub in full.pop("$defs", {}).items():
            if defs.setdefault(name, sub) != sub:
                raise ValueError(f"two different models named {name} in the job schema")
        tops.append((root.__name__, full))

    def hidden(name: str) -> set[str]:
        cls = classes.get(name)
        return {key for key, field in cls.model_fields.items() if field.exclude} if cls else set()

    lines = ["## Jobs by task", ""]
    for name, full in tops:
        task = full["properties"]["task"].get("const", full["properties"]["task"].get("default"))
        lines += [f"- `task: {task}`: [{name}](#{_anchor(name)})"]
    lines += [""]
    for name, full in tops:
        lines += _model_table(name, full, hidden(name))
    lines += ["## Sections", ""]
    for name in sorted(defs):
        lines += _model_table(name, defs[name], hidden(name))
    return "\n".join(lines)


def build_cli_parser() -> argparse.ArgumentParser:
    """The parser ``mpcfl`` runs, from whichever function mpcfl.cli builds it with."""
    from mpcfl import cli

    for name in ("build_parser", "_parser", "parser"):
        builder = getattr(cli, name, None)
        if callable(builder):
            return builder()
    raise LookupError("mpcfl.cli builds no parser (expected build_parser())")


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # aliases share a parser
                    seen.add(id(sub))
                    found.append((name, helps.get(name, ""), sub))
    return found


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            names = ", ".join(f"`{o}`" for o in action.option_strings)
            if action.nargs != 0:
                metavar = action.metavar or (action.dest.upper())
                names += f" `{metavar if isinstance(metavar, str) else ' '.join(metavar)}`"
        else:
            names = f"`{action.metavar or action.dest}`"
        help_text = formatter._expand_help(action) if action.help and action.help != argparse.SUPPRESS else ""
        details = []
        if action.choices is not None:
            details.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
        if action.required and action.option_strings:
            details.append("required")
        if (
            action.option_strings and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS, False)
        ):
            details.append(f"default `{action.default}`")
        rows.append(f"| {names} | {_escape(help_text)} | {_escape('; '.join(details))} |")
    return rows


def _command_section(path: str, help_text: str, parser: argparse.ArgumentParser, level: int) -> list[str]:
    usage = parser.format_usage().strip().removeprefix("usage: ")
    lines = [f"{'#' * level} `{path}`", ""]
    if help_text:
        lines += [_escape(help_text[0].upper() + help_text[1:]) + ".", ""]
    lines += ["```text", usage, "```", ""]
    rows = _option_rows(parser)
    if rows:
        lines += ["| argument | what | notes |", "|---|---|---|", *rows, ""]
    for name, sub_help, sub in _subcommands(parser):
        lines += _command_section(f"{path} {name}", sub_help, sub, min(level + 1, 6))
    return lines


def cli_markdown() -> str:
    """Every subcommand and option of the ``mpcfl`` command, walked from its argparse parser."""
    parser = build_cli_parser()
    lines = []
    if parser.description:
        lines += [parser.description, ""]
    lines += _command_section(parser.prog, "", parser, 2)
    return "\n".join(lines)


GENERATORS = {"job-schema": job_schema_markdown, "cli": cli_markdown}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    def generate(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise KeyError(f"{page.file.src_path}: no generator named {name!r} (known: {', '.join(GENERATORS)})")
        return GENERATORS[name]()

    return MARKER.sub(generate, markdown)
