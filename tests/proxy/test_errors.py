"""Every exception the proxy defines has one root, and is drawn in ``proxy/errors.py``."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import proxy
from proxy import errors
from proxy.errors import ProxyError


def defined_in_proxy() -> list[type[BaseException]]:
    found = []
    for module in pkgutil.walk_packages(proxy.__path__, "proxy."):
        if module.name.rsplit(".", 1)[-1] == "__main__":  # runs the CLI when imported
            continue
        imported = importlib.import_module(module.name)
        for _, cls in inspect.getmembers(imported, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == module.name:
                found.append(cls)
    return found


def test_the_walk_finds_the_exceptions() -> None:
    names = {cls.__name__ for cls in defined_in_proxy()}
    assert {"OriginError", "BadPath", "ConfigError", "ListenError", "_TooMany"} <= names


def test_every_proxy_exception_derives_from_the_root_and_is_drawn_with_its_module() -> None:
    assert errors.__doc__ is not None
    drawn = {
        line.rpartition("── ")[2].split()[0]: line  # "│   ├── Name  module.py: ..."
        for line in errors.__doc__.splitlines()
        if "── " in line
    }
    for cls in defined_in_proxy():
        if cls is ProxyError:
            continue
        assert issubclass(cls, ProxyError), f"{cls.__module__}.{cls.__qualname__} is no ProxyError"
        assert cls.__name__ in drawn, f"{cls.__qualname__} is not drawn in proxy/errors.py"
        module = cls.__module__.removeprefix("proxy.").replace(".", "/") + ".py"
        assert module in drawn[cls.__name__], f"{cls.__qualname__}: drawn without {module}"


def test_the_value_errors_stay_value_errors() -> None:
    from proxy.paths import BadPath
    from proxy.templates import TemplateError

    # They were ValueErrors before the root: whoever catches ValueError around them still does.
    assert issubclass(BadPath, ValueError)
    assert issubclass(TemplateError, ValueError)
