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
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["setting", "check_fields", "field_name", "naming", "flag_of"]

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
    """
    metadata = {
        "help": help,
        "flag": flag,
        "choices": None if choices is None else tuple(choices),
        "at_least": at_least,
        "positive": positive,
        "changes_run": changes_run,
        "cli": cli,
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
