"""`ops config set`: edit a job spec in place, keeping its comments and layout (ruamel round-trip).

Values are written as they were typed (`1e-4` stays `1e-4`). A key added to a mapping goes after
its last line but before the full-line comments that follow it, which introduce whatever comes
next. The edited text is validated as a whole before the file is replaced; an invalid value
leaves the file byte-for-byte as it was.
"""

import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.tokens import CommentToken

from diffusion.config import ConfigError, parse_assignment, parse_yaml
from diffusion.records import atomic_write
from ops.spec import check_name, spec_override, validate_spec


class Typed(str):
    """A number, boolean or null written exactly as it was typed (`.5e-3`, `FALSE`), under the tag
    YAML reads it as: ruamel would print its own spelling (`50.e-5`, `false`)."""

    def __new__(cls, text: str, tag: str):
        typed = super().__new__(cls, text)
        typed.tag = tag
        return typed


SCALAR_TAGS = {bool: "bool", int: "int", float: "float", type(None): "null"}


def as_typed(text: str, value: Any) -> Any:
    """`value`, parsed from `text`, kept as `text` where it is a number, a boolean or null."""
    kind = next((name for python_type, name in SCALAR_TAGS.items() if isinstance(value, python_type)), None)
    return Typed(text.strip(), f"tag:yaml.org,2002:{kind}") if kind and text.strip() else value


def round_trip_yaml() -> YAML:
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long lines the author wrote
    # ruamel writes None as an empty value; specs spell it `null`.
    yaml.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    yaml.representer.add_representer(Typed, lambda representer, data: representer.represent_scalar(data.tag, data))
    return yaml


def last_line_comment(node) -> tuple[Any, Any, int] | None:
    """(container, key, slot) of the comment that ruamel keeps after `node`'s last line: on its last
    key (mappings) or item (sequences), at the deepest block-style level."""
    holder = None
    while isinstance(node, (CommentedMap, CommentedSeq)) and len(node) and not node.fa.flow_style():
        key, slot = (list(node)[-1], 2) if isinstance(node, CommentedMap) else (len(node) - 1, 0)
        holder, node = (node, key, slot), node[key]
    return holder


def move_following_comments(source: tuple[Any, Any, int], target: tuple[Any, Any, int]) -> None:
    """The full-line comments after `source`'s line go after `target`'s; an end-of-line comment stays."""
    container, key, slot = source
    token = (container.ca.items.get(key) or [None] * 4)[slot]
    if token is None:
        return
    end_of_line, _, following = token.value.partition("\n")
    if not following.strip():
        return
    container.ca.items[key][slot] = CommentToken(end_of_line + "\n", token.start_mark) if end_of_line.strip() else None
    target_container, target_key, target_slot = target
    entry = target_container.ca.items.setdefault(target_key, [None] * 4)
    entry[target_slot] = CommentToken("\n" + following, token.start_mark)


def indents(text: str) -> tuple[int, int, int]:
    """(mapping, sequence, offset) indentation as the file writes it (ruamel's YAML.indent), so that
    an edit keeps a 4-space file in 4 spaces; (2, 2, 0) when the file shows none."""
    mapping, sequence, offset = None, None, None
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    for parent, child in zip(lines, lines[1:]):
        depth, child_depth = len(parent) - len(parent.lstrip()), len(child) - len(child.lstrip())
        if not parent.rstrip().endswith(":") or child_depth <= depth and not child.lstrip().startswith("- "):
            continue
        if child.lstrip().startswith("- ") and sequence is None:
            offset = child_depth - depth
            sequence = offset + 2
        elif not child.lstrip().startswith("- ") and mapping is None:
            mapping = child_depth - depth
    return mapping or 2, sequence or 2, offset or 0


def set_values(path: Path, assignments: list[str]) -> list[tuple[str, Any, Any]]:
    """Apply KEY=VALUE assignments to the spec file; returns (key, old, new) for each. The file keeps
    its indentation, line endings and byte-order mark."""
    yaml = round_trip_yaml()
    raw = path.read_bytes()
    original = raw.decode("utf-8", errors="replace")
    mapping, sequence, offset = indents(original)
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
    document = parse_yaml(raw, str(path), yaml)
    if not isinstance(document, dict):
        validate_spec(document, str(path))  # raises: a spec is a mapping, or there is nothing to set
    grown = {}  # id -> (mapping, where its comments after the last line were before keys were added)
    changes = []
    for text in assignments:
        parts, value = parse_assignment(spec_override(text), yaml)
        node = document
        for depth, part in enumerate([*parts[:-1], None]):
            key = parts[-1] if part is None else part
            if key not in node and id(node) not in grown:
                grown[id(node)] = (node, last_line_comment(node))
            if part is None:
                break
            if part not in node or node[part] is None:
                node[part] = CommentedMap()
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(
                    f"{path}: {'.'.join(parts[: depth + 1])}: is a value, not a section; cannot set {text!r}"
                )
        old = node.get(parts[-1])
        node[parts[-1]] = as_typed(text.partition("=")[2], value)
        changes.append((".".join(parts), old, value))
    for mapping, before in grown.values():
        after = last_line_comment(mapping)
        if before is not None and after is not None and after[:2] != before[:2]:
            move_following_comments(before, after)
    buffer = io.StringIO()
    yaml.dump(document, buffer)
    new_text = buffer.getvalue()

    check_name(validate_spec(parse_yaml(new_text, str(path)), str(path)), path)
    if "\r\n" in original:
        new_text = new_text.replace("\r\n", "\n").replace("\n", "\r\n")
    bom = "\ufeff" if original.startswith("\ufeff") and not new_text.startswith("\ufeff") else ""
    atomic_write(path, (bom + new_text).encode())
    return changes
