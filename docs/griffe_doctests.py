"""A griffe extension for the docs build: keras-fim's doctest examples.

keras-fim's docstrings follow the Keras convention::

    Example:

    >>> model = ...
    >>> model.output_shape
    (None, 10)

with the doctest lines at the docstring's own indentation. Google-style
parsers only read a section's indented lines, so the doctests would be
rendered as Markdown (``>>>`` is a nested block quote there, and an output
such as ``[16, 32]`` under a ``[...]`` line reads as a reference link). This
extension rewrites such a block, before parsing, as the equivalent indented
``Examples:`` section, which mkdocstrings renders as Python console code.
The source files are not changed; docstrings already indented are left alone.
"""

from __future__ import annotations

import re

import griffe

_HEADER = re.compile(r"^(?P<indent>\s*)Examples?:\s*$")
_SECTION = re.compile(r"^[A-Z][A-Za-z ]*:\s*$")


def indent_examples(text: str) -> str:
    """`text` with every unindented ``Example(s):`` block indented."""
    lines = text.split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        match = _HEADER.match(lines[index])
        if not match:
            out.append(lines[index])
            index += 1
            continue
        indent = match.group("indent")
        body_start = index + 1
        while body_start < len(lines) and not lines[body_start].strip():
            body_start += 1
        if body_start == len(lines) or not lines[body_start].startswith(indent + ">>>"):
            out.append(lines[index])  # already indented, or not a doctest
            index += 1
            continue
        out.append(f"{indent}Examples:")
        index = body_start
        while index < len(lines):
            line = lines[index]
            if line.strip() and (
                not line.startswith(indent) or _SECTION.match(line[len(indent) :])
            ):
                break
            out.append(f"{indent}    {line[len(indent) :]}" if line.strip() else "")
            index += 1
        while out and not out[-1].strip():
            out.pop()
        out.append("")
    return "\n".join(out).rstrip("\n") + ("\n" if text.endswith("\n") else "")


class UnindentedDoctestExamples(griffe.Extension):
    """Indents the doctest examples of every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = indent_examples(obj.docstring.value)
