"""Help that reads like a normal command line: ``--model TEXT``, ``--top-k INTEGER``, flags with no type.

Recent typer versions print every value type as ``<str>``, ``<int>`` or ``<list[Path]>``, and in rich mode
``<bool>`` after flags too. The app turns rich help off (``rich_markup_mode=None``, so flags show no type and
``clipsearch[ray]`` is not eaten as markup), and this names the types the way click and most tools do.
"""

from __future__ import annotations

CLICK_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "Path": "PATH", "bool": "BOOLEAN"}


def plain_type(label: str) -> str:
    """``<str>`` -> ``TEXT``, ``<list[Path]>`` -> ``PATH``, ``<int range>`` -> ``INTEGER``; choices stay ``a|b``."""
    inner = label[1:-1] if label.startswith("<") and label.endswith(">") else label
    if inner.startswith("list[") and inner.endswith("]"):
        inner = inner[5:-1]
    inner = inner.removesuffix(" range")
    if "|" in inner:
        return inner
    return CLICK_NAMES.get(inner, inner.upper())


def use_plain_types() -> None:
    """Install ``plain_type`` on typer's parameters (a no-op on typer versions without ``display_type``)."""
    from typer import core

    for kind in (core.TyperOption, core.TyperArgument):
        original = getattr(kind, "display_type", None)
        if original is None or getattr(original, "plain", False):
            continue

        def display_type(self, ctx, _original=original):
            label = _original(self, ctx)
            return plain_type(label) if isinstance(label, str) else label

        display_type.plain = True  # type: ignore[attr-defined]
        kind.display_type = display_type
