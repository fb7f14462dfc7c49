"""One strict YAML loader for every configuration file the repository reads.

PyYAML's ``safe_load`` builds only plain types, but it still accepts two things a
hand-written config never needs and that do harm:

* **anchors and aliases** (``&a`` / ``*a``): nine nested lists of nine aliases each
  expand to 9**9 (387 million) references, the "billion laughs" that exhausts memory
  when the result is walked (validated, copied, printed). No config of ours uses them,
  so any anchor or alias is refused;
* **duplicate keys**: ``safe_load`` keeps the last value silently, so a key pasted
  twice with two values trains with whichever came last.

Both are refused while the document is composed, with a one-line ``ValueError``
naming the line; a syntax error is reported the same way. Files larger than
``max_bytes`` are refused before they are parsed.
"""

import os
from typing import Any

import yaml

from utils.input_files import check_is_file

__all__ = ["load_yaml_file", "load_yaml_text", "MAX_BYTES"]

MAX_BYTES = 1 << 20  # a config of ours is a few kB


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses anchors, aliases and duplicate mapping keys."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if (
            isinstance(event, yaml.AliasEvent)
            or getattr(event, "anchor", None) is not None
        ):
            kind = "alias" if isinstance(event, yaml.AliasEvent) else "anchor"
            raise _Refused(
                f"YAML {kind} {('*' if kind == 'alias' else '&') + event.anchor} "
                "is not allowed (write the value out)",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let PyYAML report it
                break
            if first is not None:
                raise _Refused(
                    f"duplicate key {key!r} (first on line {first})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _Refused(yaml.YAMLError):
    """A construct the strict loader refuses, with the position it was found at."""

    def __init__(self, message: str, mark):
        super().__init__(message)
        self.message, self.mark = message, mark


def _describe(exc: yaml.YAMLError) -> str:
    """``problem (line N)`` from any PyYAML error, on one line."""
    if isinstance(exc, _Refused):
        return f"{exc.message} (line {exc.mark.line + 1})"
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "syntax error"
    where = f" (line {mark.line + 1})" if mark is not None else ""
    return f"{' '.join(str(problem).split())}{where}"


def load_yaml_text(text: str, source: str) -> Any:
    """Parse ``text`` strictly; ``source`` names it in the one-line ``ValueError``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ValueError(f"{source} is not valid YAML: {_describe(exc)}") from None


def load_yaml_file(
    path: str, what: str = "config file", max_bytes: int = MAX_BYTES
) -> Any:
    """Read and parse the YAML file ``path`` strictly (see the module docstring).

    ``what`` starts the error messages (``"config file"``, ``"datasets config"``).
    Raises ``ValueError`` for a missing, unreadable, oversized or invalid file.
    """
    check_is_file(path, what)  # /dev/null, a pipe: its size would say nothing
    size = os.path.getsize(path)
    if size > max_bytes:
        raise ValueError(
            f"{what} {path} is {size} bytes, more than the {max_bytes} a "
            "config may have"
        )
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise ValueError(f"cannot read {what} {path}: {reason}") from None
    return load_yaml_text(text, f"{what} {path}")
