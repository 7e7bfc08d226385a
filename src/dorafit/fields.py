"""Documented, validated dataclass fields: one place for an option's default, help, choices and range.

:func:`option` declares a field; :func:`check` validates every field of a dataclass instance against its
declared type, choices and range. :class:`dorafit.AdapterConfig` and :class:`dorafit.train.options.TrainConfig`
use both, so a value from the Python API, the command line or a config file passes through the same checks and
fails with the same message, e.g. ``rank must be an integer >= 1, got True``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any

#: metadata keys that describe a value's domain (see :func:`option`)
DOMAIN = ("choices", "minimum", "maximum", "above", "below")


def option(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None,
           maximum: float | None = None, above: float | None = None, below: float | None = None,
           metavar: str | None = None, **metadata) -> Any:
    """A dataclass field with its help text and domain: ``choices``, or bounds ``minimum <= v <= maximum`` and
    ``above < v < below`` (any subset). List defaults are copied per instance."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum, "above": above,
            "below": below, "metavar": metavar, **metadata}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def base_type(cls: type, name: str) -> tuple[Any, bool, bool]:
    """(element type, is_list, optional) of field ``name`` of dataclass ``cls``; element type ``object`` when the
    hint is not a plain int / float / bool / str (e.g. a Union of several kinds)."""
    hint = typing.get_type_hints(cls)[name]
    optional = False
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            return object, False, optional
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True, optional
    return (hint if hint in (int, float, bool, str) else object), False, optional


def _bounds(meta: dict) -> str:
    parts = []
    if meta.get("minimum") is not None:
        parts.append(f">= {meta['minimum']:g}")
    if meta.get("above") is not None:
        parts.append(f"> {meta['above']:g}")
    if meta.get("maximum") is not None:
        parts.append(f"<= {meta['maximum']:g}")
    if meta.get("below") is not None:
        parts.append(f"< {meta['below']:g}")
    return " and ".join(parts)


def describe_domain(kind: Any, meta: dict) -> str:
    """``an integer >= 1``, ``one of lora, dora``, ``a number > 0 and < 1``, ``true or false``..."""
    if meta.get("choices"):
        return "one of " + ", ".join(map(str, meta["choices"]))
    noun = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, "a value")
    bounds = _bounds(meta)
    return f"{noun} {bounds}" if bounds else noun


def problem(kind: Any, is_list: bool, optional: bool, meta: dict, value: Any) -> str | None:
    """Why ``value`` is not in the field's domain, or None if it is."""
    if value is None:
        return None if optional else "a value is required"
    if is_list:
        if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
            plural = {str: "strings", int: "integers", float: "numbers", bool: "true/false values"}.get(kind, "values")
            return f"must be a list of {plural}"
        return None
    if kind is object:
        return None
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if ok and kind is float and not math.isfinite(value):
        ok = False
    if ok and meta.get("choices") and value not in meta["choices"]:
        ok = False
    if ok and kind in (int, float):
        lo, hi, above, below = (meta.get(k) for k in ("minimum", "maximum", "above", "below"))
        ok = ((lo is None or value >= lo) and (hi is None or value <= hi) and (above is None or value > above)
              and (below is None or value < below))
    return None if ok else f"must be {describe_domain(kind, meta)}"


def check(obj: Any, label=lambda name: name) -> None:
    """A ValueError naming the first field of dataclass ``obj`` whose value is outside its declared domain.

    ``label(name)`` is how the field is named in the message (e.g. ``--batch-size`` for a command-line tool)."""
    cls = type(obj)
    for f in dataclasses.fields(cls):
        kind, is_list, optional = base_type(cls, f.name)
        value = getattr(obj, f.name)
        why = problem(kind, is_list, optional, f.metadata, value)
        if why:
            raise ValueError(f"{label(f.name)} {why}, got {value!r}")


# ---- the command line -----------------------------------------------------------------------------------
def flag(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type, suppress_defaults: bool = False) -> None:
    """One command-line option per field of dataclass ``cls``, with its help text, its default stated, and
    ``--x / --no-x`` for booleans. Values are converted to the field's type here and checked by :func:`check`
    (so a file and the command line fail alike); ``suppress_defaults`` leaves untyped options out of the
    namespace (for tools that layer a config file under the command line)."""
    for f in dataclasses.fields(cls):
        kind, is_list, _ = base_type(cls, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata["help"]
        if "default" not in help_text:  # help that explains its own default says it in words
            help_text += f" (default: {'none' if default is None else default})"
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS if suppress_defaults else default,
                                  help=help_text.replace("%", "%%"))
        if kind is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
            continue
        choices = f.metadata.get("choices")
        kw["metavar"] = "{" + ",".join(choices) + "}" if choices else \
            f.metadata.get("metavar") or {int: "N", float: "X"}.get(kind, "VALUE")
        parser.add_argument(flag(f.name), nargs="+" if is_list else None, type=_parser(f.name, kind), **kw)


def _parser(name: str, kind: type):
    """argparse ``type=``: the text converted to the field's type, or a message naming the option."""
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag(name)} must be {describe_domain(kind, {})}, got {text!r}") \
                from None
    parse.__name__ = kind.__name__
    return parse


def from_arguments(cls: type, args: argparse.Namespace):
    """An instance of dataclass ``cls`` from the options :func:`add_arguments` added (validated on creation if
    the class checks itself, as :class:`dorafit.generation.SamplingOptions` does)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
