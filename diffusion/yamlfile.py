"""YAML that a person wrote (a job spec, a run config, a --set value, ops.yaml), read safely.

Config files need plain mappings, lists and scalars, so anything else is refused before it is
built: anchors and aliases (nested ones expand to gigabytes, a "billion laughs"), tags other than
the scalar ones (`!!python/object`, `!custom`, `!!set`), and nesting deeper than MAX_DEPTH
(which would exhaust the recursion of the loader). Every problem is one ConfigError line with
its place. Only ruamel.yaml here, no pydantic: `ops` reads ops.yaml through this on every command.
"""

from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

MAX_DEPTH = 64
SCALAR_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null")}


class ConfigError(ValueError):
    """A config problem, always a single readable line."""


def parse_yaml(text: str | bytes, source: str, yaml: YAML | None = None, inline: bool = False) -> Any:
    """One YAML document (bytes must be UTF-8), loaded by `yaml` (default: the safe loader).

    Raises ConfigError, one line: `source:line:column: problem` (`source (column N)` for an
    `inline` value such as a --set) for text that does not parse, a tab indent, a duplicate key,
    an anchor, alias or tag, or deep nesting; the line of the first byte that is not UTF-8."""

    def place(mark) -> str:
        return f" (column {mark.column + 1})" if inline else f":{mark.line + 1}:{mark.column + 1}"

    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = text[: exc.start].count(b"\n") + 1
            raise ConfigError(
                f"{source}:{line}: byte 0x{text[exc.start]:02x} is not UTF-8; save the file as UTF-8"
            ) from None
    yaml = yaml or YAML(typ="safe")
    try:
        depth = 0
        for event in yaml.parse(text):
            kind = type(event).__name__
            if getattr(event, "anchor", None) is not None or kind == "AliasEvent":
                raise ConfigError(
                    f"{source}{place(event.start_mark)}: YAML anchors and aliases (&name, *name) "
                    "are not allowed; write the values out"
                )
            tag = getattr(event, "tag", None)
            if tag is not None and tag not in SCALAR_TAGS:
                raise ConfigError(
                    f"{source}{place(event.start_mark)}: the YAML tag {tag!r} is not allowed; write a plain value"
                )
            depth += kind in ("MappingStartEvent", "SequenceStartEvent")
            depth -= kind in ("MappingEndEvent", "SequenceEndEvent")
            if depth > MAX_DEPTH:
                raise ConfigError(f"{source}{place(event.start_mark)}: nested more than {MAX_DEPTH} levels deep")
        return yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        # ruamel says what it expected in `context` and what it found in `problem`.
        problem = " ".join(str(exc.problem or exc.context).split()).split(" with value ")[0]  # duplicate keys
        if exc.problem and exc.context and problem.startswith("but "):
            problem = f"{exc.context}, {problem}"
        elif exc.problem and exc.context_mark and "duplicate" not in problem:
            start = exc.context_mark
            problem += f" {exc.context} begun at " + (
                f"column {start.column + 1}" if inline else f"{start.line + 1}:{start.column + 1}"
            )
        raise ConfigError(f"{source}{place(mark) if mark else ''}: not valid YAML: {problem}") from None
    except YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
