"""`ops config set`: edit a job spec in place, keeping its comments and layout (ruamel round-trip).

The edited text is validated as a whole before the file is replaced; an invalid value leaves
the file byte-for-byte as it was.
"""

import io
import os
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from diffusion.config import ConfigError, parse_assignment, parse_yaml
from ops.spec import check_name, spec_override, validate_spec


def set_values(path: Path, assignments: list[str]) -> list[tuple[str, Any, Any]]:
    """Apply KEY=VALUE assignments to the spec file; returns (key, old, new) for each."""
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long lines the author wrote
    # ruamel writes None as an empty value; specs spell it `null`.
    yaml.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = parse_yaml(path.read_bytes(), str(path), yaml)
    if not isinstance(document, dict):
        validate_spec(document, str(path))  # raises: a spec is a mapping, or there is nothing to set
    changes = []
    for text in assignments:
        parts, value = parse_assignment(spec_override(text))
        node = document
        for depth, part in enumerate(parts[:-1]):
            if part not in node or node[part] is None:
                node[part] = CommentedMap()
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: {'.'.join(parts[: depth + 1])}: is a value, not a section; cannot set {text!r}")
        old = node.get(parts[-1])
        node[parts[-1]] = value
        changes.append((".".join(parts), old, value))
    buffer = io.StringIO()
    yaml.dump(document, buffer)
    new_text = buffer.getvalue()

    check_name(validate_spec(YAML(typ="safe").load(new_text), str(path)), path)
    candidate = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    candidate.write_text(new_text)
    os.replace(candidate, path)
    return changes
