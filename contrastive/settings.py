"""Settings dataclasses: each field says its help, its flag, its allowed values, once.

Every configuration of the training system (``LossConfig``, ``OptimConfig``,
``TrainConfig`` and the experiment config that nests them) is a frozen dataclass whose
fields are made with :func:`setting`. The field's metadata is the single source of

- the help text and the command-line flag (the CLI generates its parser from the tree),
- the allowed values (``choices``, ``at_least``, ``positive``), checked by
  :func:`check_fields` when the dataclass is built, and
- whether changing it changes the computation (``changes_run``): a resumed run must agree
  with its checkpoints on every setting that does.

Error messages name a field through :func:`field_name`, which a caller can switch to the
flag names (:func:`naming`), so the CLI's one-line errors and the library's say the same
thing in the caller's own words.

The tree and its flags: :func:`walk` lists a tree's leaf settings, :func:`flag_parser`
generates an argparse parser from them and :func:`build_tree` builds the tree back from the
parsed values, so each check runs exactly once, when its dataclass is built, and a bad flag
fails with one line (:class:`ConfigError`) that names the flag.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import math
import numbers
import os
import tempfile
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = [
    "ConfigError",
    "setting",
    "check_fields",
    "field_name",
    "naming",
    "flag_of",
    "walk",
    "build_tree",
    "flag_parser",
    "OneLineParser",
]


class ConfigError(ValueError):
    """A bad configuration; the message is one line that says what to change."""


_NAMING: contextvars.ContextVar[Callable[[Any, str], str] | None] = contextvars.ContextVar(
    "settings_naming", default=None
)


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 - the argparse word for it
    *,
    flag: str | None = None,
    choices: Sequence[Any] | None = None,
    at_least: float | None = None,
    positive: bool = False,
    changes_run: bool = True,
    cli: bool = True,
    path: bool = False,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its help, flag name and checks in the metadata.

    Args:
      default: the default value (or ``default_factory`` for nested configs).
      help: one line for ``--help``.
      flag: the flag's name without dashes (default: the field name with ``-``).
      choices: allowed values; ``None`` never matches a choice unless listed.
      at_least: lower bound for numbers (``None`` values pass: they mean "default").
      positive: the number must be > 0 (and finite).
      changes_run: False for settings that cannot change what is computed (logging,
        progress, paths): a resumed run may change them freely.
      cli: False keeps the field off the command line (derived from other settings).
      path: a file-system path: ``~`` is expanded when the tree is built from flags.
    """
    metadata = {
        "help": help,
        "flag": flag,
        "choices": None if choices is None else tuple(choices),
        "at_least": at_least,
        "positive": positive,
        "changes_run": changes_run,
        "cli": cli,
        "path": path,
    }
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(field: dataclasses.Field) -> str:
    """``--learning-rate`` for a field ``learning_rate`` (or its ``flag`` metadata)."""
    return "--" + (field.metadata.get("flag") or field.name).replace("_", "-")


def field_name(obj: Any, name: str) -> str:
    """How an error message names field ``name`` of ``obj``: ``Class.name`` or a flag."""
    fn = _NAMING.get()
    if fn is not None:
        return fn(obj, name)
    return f"{type(obj).__name__}.{name}"


@contextlib.contextmanager
def naming(fn: Callable[[Any, str], str]) -> Iterator[None]:
    """Within the block, error messages name fields by ``fn(obj, field_name)``."""
    token = _NAMING.set(fn)
    try:
        yield
    finally:
        _NAMING.reset(token)


def check_fields(obj: Any) -> None:
    """Check every field of the dataclass ``obj`` against its metadata; ValueError if bad."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        meta = f.metadata
        if not meta or value is None:
            continue
        name = field_name(obj, f.name)
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            shown = ", ".join(str(c) for c in choices)
            raise ValueError(f"unknown {name} {value!r}: use one of {shown}")
        is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if (meta.get("at_least") is not None or meta.get("positive")) and not is_number:
            raise ValueError(f"{name} must be a number, got {value!r}")
        if meta.get("at_least") is not None and not value >= meta["at_least"]:
            raise ValueError(f"{name} must be at least {meta['at_least']:g}, got {value}")
        if meta.get("positive") and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive finite number, got {value}")


# ------------------------------------------------------------------ the tree <-> flags


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def walk(obj: Any) -> Iterator[tuple[dataclasses.Field, Any, Any]]:
    """Every leaf setting on the command line of a config tree: ``(field, value, type)``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if _is_config(hints[f.name]):
            yield from walk(value)
        elif f.metadata.get("cli", True):
            yield f, value, hints[f.name]


def _dest(f: dataclasses.Field) -> str:
    return flag_of(f)[2:].replace("-", "_")


def _flag_name(obj: Any, name: str) -> str:
    for f in dataclasses.fields(obj):
        if f.name == name:
            return flag_of(f)
    return name


def build_tree(cls: type, values: dict[str, Any]) -> Any:
    """Build the tree of ``cls`` from flat ``{dest: value}`` (argparse's names); values not
    given keep their defaults. :class:`ConfigError` (one line, naming the flag) if bad."""

    def node(c: type) -> Any:
        hints = typing.get_type_hints(c)
        kwargs = {}
        for f in dataclasses.fields(c):
            if _is_config(hints[f.name]):
                kwargs[f.name] = node(hints[f.name])
            elif f.metadata.get("cli", True) and _dest(f) in values:
                v = values[_dest(f)]
                if f.metadata.get("path") and isinstance(v, str) and v:
                    v = os.path.expanduser(v)
                kwargs[f.name] = v
        return c(**kwargs)

    with naming(_flag_name):
        try:
            return node(cls)
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None


def tree_values(obj: Any) -> dict[str, Any]:
    """``{dest: value}`` of every leaf setting: what :func:`build_tree` takes back."""
    return {_dest(f): v for f, v, _ in walk(obj)}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def _optional(kind: type):
    def parse(s: str):
        return None if s.lower() == "none" else kind(s)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _argument_type(tp: Any):
    """The argparse ``type`` for a field annotation: int, float, str, or ``X | None``."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        (inner,) = [a for a in args if a is not type(None)]
        return _optional(inner)
    return tp


def flag_parser(
    defaults: Any, *, prog: str, description: str, required: Sequence[str] = ()
) -> argparse.ArgumentParser:
    """Flags for every setting of the tree ``defaults``, help from the fields (choices are
    checked when the tree is built, so that the error names the flag in one line).
    ``required``: flags (``"--workdir"``) the user must give."""
    p = OneLineParser(
        prog=prog,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f, value, tp in walk(defaults):
        flag = flag_of(f)
        help_text = f.metadata.get("help") or " "
        choices = f.metadata.get("choices")
        if choices:
            help_text += f" ({', '.join(map(str, choices))})"
        if flag in required:
            help_text += " (required)"
            value = argparse.SUPPRESS
        if tp is bool:
            p.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=value, help=help_text
            )
        else:
            p.add_argument(
                flag,
                type=_argument_type(tp),
                default=value,
                required=flag in required,
                help=help_text,
            )
    return p


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why this process cannot write the directory ``path`` (None: it can; it is created if
    missing). Tried, not inferred from permission bits: ``os.access`` says yes to root on a
    read-only file system, and a path below a regular file fails only when something is
    created."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return e.strerror or type(e).__name__
    return None
