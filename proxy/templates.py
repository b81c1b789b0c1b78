"""Path and key templates, compiled once at start.

``/users/{id}`` becomes a regular expression (``PathTemplate``; ``{rest...}`` at its end takes
the rest of the path, slashes and all), and the key template
``users:{id}`` a format string checked against the path's parameters (``KeyTemplate``). The
settings check a route's templates with these at load time; ``proxy.routes`` keeps the compiled
ones.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from proxy.errors import ProxyError

_PARAM = re.compile(r"\{([^{}]*)\}")
_REST = "..."  # {name...}: the rest of the path, any number of segments
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class TemplateError(ProxyError, ValueError):
    """A path or key template that cannot be compiled."""


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """``/users/{id}``: literal text, and ``{name}`` for one path segment; ``{name...}``, at
    the end only, for the rest of the path (``/{path...}`` matches every path)."""

    template: str
    pattern: re.Pattern[str]
    params: tuple[str, ...]

    @classmethod
    def compile(cls, template: str) -> PathTemplate:
        if not template.startswith("/"):
            raise TemplateError(f"{template!r} must start with /")
        leftover = _PARAM.sub("", template)
        if "{" in leftover or "}" in leftover:
            raise TemplateError(f"{template!r} has an unbalanced brace")
        params: list[str] = []
        parts: list[str] = []
        position = 0
        for match in _PARAM.finditer(template):
            name = match.group(1)
            rest = name.endswith(_REST)
            if rest:
                name = name.removesuffix(_REST)
                if match.end() != len(template):
                    raise TemplateError(
                        f"{{{name}...}} in {template!r} takes the rest of the path: it must end "
                        "the template"
                    )
            if not _IDENTIFIER.match(name):
                raise TemplateError(f"{{{name}}} in {template!r} is not a parameter name")
            if name in params:
                raise TemplateError(f"{{{name}}} appears twice in {template!r}")
            params.append(name)
            parts.append(re.escape(template[position : match.start()]))
            parts.append(f"(?P<{name}>.*)" if rest else f"(?P<{name}>[^/]+)")
            position = match.end()
        parts.append(re.escape(template[position:]))
        return cls(template, re.compile("".join(parts) + r"\Z"), tuple(params))

    def match(self, path: str) -> dict[str, str] | None:
        found = self.pattern.match(path)
        return found.groupdict() if found is not None else None


@dataclass(frozen=True, slots=True)
class KeyTemplate:
    """``users:{id}``: a format string over the path's parameters.

    A parameter's value never contains the template's separators: every punctuation character
    of the template's literal text (other than the unreserved ``-._~``), and ``%``, is
    percent-encoded in it (``/users/1:posts`` renders ``users:1%3Aposts``), while letters,
    digits and ``-._~`` stay as they are (``users:alice``, so a purge by the logical key finds
    it). Between two parameters the template must have such a separator. So no request can make
    its key look like the key of another resource (``users:{id}:posts`` of ``/users/1/posts``).
    """

    template: str
    fields: frozenset[str]
    escapes: dict[int, str]  # str.translate table for parameter values
    # The common template with one parameter, as (text before, its name, text after): rendered
    # by concatenation, without a format call (keys are rendered on every hit).
    single: tuple[str, str, str] | None = None

    @classmethod
    def compile(cls, template: str, params: Sequence[str]) -> KeyTemplate:
        if not template:
            raise TemplateError("a key template cannot be empty")
        try:
            fields = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise TemplateError(f"{template!r}: {exc}") from None
        escaped = {char for literal, _, _, _ in fields for char in literal if _separates(char)}
        previous_was_field = False
        for literal, name, spec, conversion in fields:
            if name is None:
                continue
            if previous_was_field and not escaped.intersection(literal):
                raise TemplateError(
                    f"{template!r}: put a separator such as ':' or '/' before {{{name}}} "
                    "(letters, digits and -._~ do not separate), so that two requests cannot "
                    "render one key"
                )
            previous_was_field = True
            if name not in params:
                known = ", ".join(f"{{{p}}}" for p in params) or "none"
                raise TemplateError(
                    f"{{{name}}} is not a parameter of the route's path (it has {known})"
                )
            if spec or conversion:
                raise TemplateError(f"{{{name}}} takes no format spec or conversion")
        escapes = {ord(char): _percent(char) for char in escaped | {"%"}}
        names = frozenset(name for _, name, _, _ in fields if name is not None)
        single = None
        if sum(name is not None for _, name, _, _ in fields) == 1:
            # The parser's literal text is the template's with "{{" and "}}" undone; each
            # literal comes with the field that follows it, if any.
            at = next(i for i, (_, name, _, _) in enumerate(fields) if name is not None)
            before = "".join(literal for literal, _, _, _ in fields[: at + 1])
            after = "".join(literal for literal, _, _, _ in fields[at + 1 :])
            single = (before, cast(str, fields[at][1]), after)
        return cls(template, names, escapes, single)

    def render(self, params: Mapping[str, str]) -> str:
        single = self.single
        if single is not None:
            return single[0] + params[single[1]].translate(self.escapes) + single[2]
        return self.template.format_map(
            {name: value.translate(self.escapes) for name, value in params.items()}
        )


def _separates(char: str) -> bool:
    """Whether a character of a template's text separates parameters (and is escaped in them)."""
    return not (char.isalnum() and char.isascii()) and char not in "-._~"


def _percent(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
