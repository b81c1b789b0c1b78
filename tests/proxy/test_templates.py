"""Path and key templates: what compiles, what is refused, and how a key renders."""

from __future__ import annotations

import pytest

from proxy.templates import KeyTemplate, PathTemplate, TemplateError


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("/a/{x}/{x}", "appears twice"),
        ("/a/{x", "unbalanced"),
        ("/a/x}", "unbalanced"),
        ("/a/{}", "is not a parameter name"),
        ("a/{x}", "must start with /"),
        ("/a/{rest...}/b", "must end the template"),
        ("/a/{rest...}{x}", "must end the template"),
        ("/a/{...}", "is not a parameter name"),
    ],
)
def test_bad_path_templates_are_refused(template: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        PathTemplate.compile(template)


@pytest.mark.parametrize(
    ("template", "path", "params"),
    [
        ("/{path...}", "/", {"path": ""}),
        ("/{path...}", "/a/b/c.json", {"path": "a/b/c.json"}),
        ("/files/{rest...}", "/files/a/b", {"rest": "a/b"}),
        ("/files/{rest...}", "/files/", {"rest": ""}),
        ("/files/{rest...}", "/files", None),
        ("/files/{rest...}", "/filesx/a", None),
        ("/v1/{org}/{rest...}", "/v1/acme/x/y", {"org": "acme", "rest": "x/y"}),
    ],
)
def test_a_rest_parameter_takes_the_rest_of_the_path(
    template: str, path: str, params: dict[str, str] | None
) -> None:
    assert PathTemplate.compile(template).match(path) == params


def test_literal_text_in_a_template_is_not_a_pattern() -> None:
    template = PathTemplate.compile("/v1.0/{id}")
    assert template.match("/v1.0/3") == {"id": "3"}
    assert template.match("/v1x0/3") is None


@pytest.mark.parametrize(
    "template",
    [
        "u:{other}",
        "u:{id!r}",
        "u:{id:>5}",
        "",
        "u:{",
        "u:{id}{order}",
        "u:{id}x{order}",
        "u:{id}-{order}",
    ],
)
def test_bad_key_templates_are_refused(template: str) -> None:
    with pytest.raises(TemplateError):
        KeyTemplate.compile(template, ["id", "order"])


@pytest.mark.parametrize(
    "template",
    ["users:{id}", "{id}", "{id}:x", "x:{id}:y", "a{{b}}:{id}:c{{d}}", "{{{id}}}", "u/{id}/{{x}}"],
)
@pytest.mark.parametrize("value", ["42", "a:b%20", "{}", "x}y{z"])
def test_a_one_parameter_key_renders_as_the_format_string_would(template: str, value: str) -> None:
    compiled = KeyTemplate.compile(template, ["id"])
    assert compiled.single is not None  # the quick form is the one under test
    escaped = value.translate(compiled.escapes)
    assert compiled.render({"id": value}) == template.format(id=escaped)
