"""Plain option values without pydantic: a cold ``clipsearch search "text"`` in a fraction of a second.

Recent typer versions coerce every parameter through a pydantic ``TypeAdapter`` built when the command runs, even
for an option left at its default: importing pydantic and building ~27 adapters cost a cold search ~90 ms of its
second (issue 27). Most values need nothing: an option not given (None), a default already of its type, a text, a
whole number, a path. ``plain_value`` gives those exactly what typer's adapter gives (a test compares the two on
every parameter of every command); anything else (choices, ranges, custom parsers, odd spellings such as ``5.0``
for an integer) goes through typer's own coercion, errors and messages included.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_args, get_origin

NOT_PLAIN = object()  # plain_value's answer when typer's own coercion must decide
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def plain_value(annotation: Any, info: Any, value: Any, many: bool) -> Any:
    """``value`` as typer would coerce it to ``annotation`` (typer's ``ParameterInfo`` ``info``; ``many``: the
    parameter takes several values), or ``NOT_PLAIN``. Paths are left to ``plain_path``."""
    if value is None:
        return () if many else None
    if info.parser is not None or getattr(info, "min", None) is not None or getattr(info, "max", None) is not None:
        return NOT_PLAIN
    if many:
        if get_origin(annotation) is not list or not isinstance(value, (list, tuple)):
            return NOT_PLAIN
        (item_type,) = get_args(annotation)
        items = [plain_value(item_type, info, item, False) for item in value]
        return NOT_PLAIN if any(item is NOT_PLAIN for item in items) else items
    if annotation is str and isinstance(value, str):
        return value
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation in (int, float) and type(value) is annotation:
        return value
    if annotation is int and isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value)
    if annotation is float and isinstance(value, str) and _DECIMAL.fullmatch(value):
        return float(value)
    return NOT_PLAIN


def plain_path(annotation: Any, info: Any, value: Any) -> Path | None:
    """A ``Path`` option's text as a ``Path`` (typer's checks then run on it as they would), or None."""
    if annotation is Path and info.path_type is None and isinstance(value, (str, Path)) and str(value):
        return Path(value)
    return None


def use_plain_values() -> None:
    """Coerce plain values on typer's parameters without building their pydantic adapters (a no-op on typer
    versions without per-parameter runtime coercion)."""
    from typer import core

    try:
        from typer._param_types import coerce_cli_path
    except ImportError:
        return
    for kind in (core.TyperOption, core.TyperArgument):
        original = getattr(kind, "get_runtime_param", None)
        if original is None or getattr(original, "plain", False):
            continue

        def get_runtime_param(self, _original=original):
            return _PlainFirst(self, _original, coerce_cli_path)

        get_runtime_param.plain = True  # type: ignore[attr-defined]
        kind.get_runtime_param = get_runtime_param


class _PlainFirst:
    """A parameter's coercion: ``plain_value`` first, typer's own runtime coercion (built on demand) otherwise."""

    def __init__(self, parameter, typer_coercion, coerce_cli_path):
        self.parameter, self.typer_coercion, self.coerce_cli_path = parameter, typer_coercion, coerce_cli_path

    def coerce(self, value: Any, param, ctx) -> Any:
        descriptor = self.parameter.type_descriptor
        annotation, info = descriptor.annotation, descriptor.parameter_info
        if descriptor.file_annotation is None:
            many = bool(param.multiple or param.nargs == -1)
            plain = plain_value(annotation, info, value, many)
            if plain is not NOT_PLAIN:
                return plain
            if many:  # `index FOLDER...`: a list of paths, each checked as typer checks one
                (item_type,) = get_args(annotation) if get_origin(annotation) is list else (None,)
                paths = [plain_path(item_type, info, item) for item in value]
                if paths and None not in paths:
                    return [self.coerce_cli_path(path, info, path_type=Path, param=param, ctx=ctx) for path in paths]
            else:
                path = plain_path(annotation, info, value)
                if path is not None:
                    return self.coerce_cli_path(path, info, path_type=annotation, param=param, ctx=ctx)
        return self.typer_coercion(self.parameter).coerce(value, param=param, ctx=ctx)
