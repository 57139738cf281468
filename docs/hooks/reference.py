"""mkdocs hook: the reference pages, generated at build time from the code, so they never drift.

A page holding `<!-- reference:job-spec -->` gets one table per section of ops.spec.JobSpec (the
nested run config, diffusion.config.RunConfig, included): every key path, its type, default,
allowed values and description. `<!-- reference:settings -->` gets the keys of ops.yaml from
ops.settings.Settings, with the comment each field carries in the source.
"""

import inspect
import json
import types
from dataclasses import MISSING, fields
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

JOB_SPEC_MARKER = "<!-- reference:job-spec -->"
SETTINGS_MARKER = "<!-- reference:settings -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if JOB_SPEC_MARKER in markdown:
        markdown = markdown.replace(JOB_SPEC_MARKER, job_spec_reference())
    if SETTINGS_MARKER in markdown:
        markdown = markdown.replace(SETTINGS_MARKER, settings_reference())
    return markdown


# ---------------------------------------------------------------------------------------------
# Job spec


def section_model(annotation) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def type_name(annotation) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if origin is Literal:
        return "choice"
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(arg) for arg in args)}]"
    return annotation.__name__


def choices(annotation) -> list:
    """The values of a Literal, also inside `Literal[...] | None`."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [value for arg in get_args(annotation) for value in choices(arg)]


def yaml_value(value) -> str:
    if isinstance(value, str):
        return value or '""'
    return json.dumps(value)  # null, true/false, numbers, lists and maps as YAML reads them


def allowed(field) -> str:
    parts = (
        [", ".join(f"`{yaml_value(value)}`" for value in choices(field.annotation))]
        if choices(field.annotation)
        else []
    )
    bounds = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=", "max_length": "length <="}
    for item in field.metadata:
        for attribute, symbol in bounds.items():
            if getattr(item, attribute, None) is not None:
                parts.append(f"{symbol} {getattr(item, attribute)}")
        if getattr(item, "pattern", None):
            parts.append(f"matches `{item.pattern}`")
    return ", ".join(parts)


def default(field) -> str:
    if field.default_factory is not None:
        return f"`{yaml_value(field.default_factory())}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{yaml_value(field.default)}`"


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def sections(model: type[BaseModel], path: str = "") -> list[tuple[str, type[BaseModel]]]:
    """(dotted path, model) for the model and every nested section, depth first."""
    found = [(path, model)]
    for name, field in model.model_fields.items():
        nested = section_model(field.annotation)
        if nested:
            found += sections(nested, f"{path}.{name}" if path else name)
    return found


def job_spec_reference() -> str:
    from ops.spec import JobSpec

    out = []
    for path, model in sections(JobSpec):
        leaves = {name: field for name, field in model.model_fields.items() if not section_model(field.annotation)}
        if not leaves:
            continue
        out += [f"## `{path}`" if path else "## Top level", ""]
        if model.__doc__:
            out += [inspect.cleandoc(model.__doc__), ""]
        out += ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
        for name, field in leaves.items():
            key = f"{path}.{name}" if path else name
            out.append(
                f"| `{key}` | {type_name(field.annotation)} | {default(field)} | {cell(allowed(field))} "
                f"| {cell(field.description or '')} |"
            )
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Settings


def settings_comments(cls) -> dict[str, str]:
    """`name: type = default  # comment` lines of the dataclass source -> {name: comment}."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        code, _, comment = line.partition("  # ")
        name = code.strip().split(":")[0]
        if comment and name.isidentifier():
            comments[name] = comment.strip()
    return comments


def settings_reference() -> str:
    from ops.settings import Settings

    comments = settings_comments(Settings)
    out = ["| key | environment | default | what |", "|---|---|---|---|"]
    for field in fields(Settings):
        value = "" if field.default is MISSING else f"`{yaml_value(field.default)}`"
        out.append(f"| `{field.name}` | `OPS_{field.name.upper()}` | {value} | {cell(comments.get(field.name, ''))} |")
    return "\n".join(out) + "\n"
