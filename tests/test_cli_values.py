"""The CLI's plain-value coercion (clipsearch/cli/plain_values.py) gives what typer's own gives, on every parameter."""

from __future__ import annotations

import pytest
import typer
from typer import core

from clipsearch.cli import app
from clipsearch.cli.plain_values import NOT_PLAIN, plain_value

SAMPLES = [None, "", "5", "-3", "+7", "007", "2.5", ".5", "1.", "1e3", "5.0", "abc", "/tmp", "cpu", "json", "a b"]


def _coerced(runtime, value, param, ctx):
    try:
        return "value", runtime.coerce(value, param=param, ctx=ctx)
    except Exception as error:  # noqa: BLE001  (compared: the same kind of refusal)
        return "error", type(error).__name__


def test_plain_values_are_coerced_as_typer_would_on_every_parameter_of_every_command():
    from typer._coercion import build_runtime_param

    group = typer.main.get_command(app)
    checked = plain = 0
    for name, command in group.commands.items():
        commands = command.commands.items() if hasattr(command, "commands") else [(name, command)]
        for _, each in commands:
            ctx = core._click.Context(each)
            for param in each.params:
                if not isinstance(param, (core.TyperOption, core.TyperArgument)):
                    continue
                for value in [*SAMPLES, param.default]:
                    if (param.multiple or param.nargs == -1) and isinstance(value, str):
                        value = (value,)
                    ours = _coerced(param.get_runtime_param(), value, param, ctx)
                    theirs = _coerced(build_runtime_param(param.type_descriptor), value, param, ctx)
                    assert ours == theirs, (name, param.name, value)
                    descriptor = param.type_descriptor
                    many = bool(param.multiple or param.nargs == -1)
                    plain += plain_value(descriptor.annotation, descriptor.parameter_info, value, many) is not NOT_PLAIN
                    checked += 1
    assert checked > 500 and plain > checked / 3  # most values take the plain path


@pytest.mark.parametrize("value", ["1_000", " 5", "0x10", "٣"])
def test_odd_spellings_of_numbers_are_left_to_typer(value):
    class Info:
        parser = None
        min = max = None

    assert plain_value(int, Info, value, False) is NOT_PLAIN
