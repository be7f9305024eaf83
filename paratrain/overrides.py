"""Command-line config overrides: ``--section.key=value`` or ``--section.key value``.

Values are TOML literals (``3e-4``, ``true``, ``"ps"``); a bare word that is not valid TOML is
taken as a string (``--parallel.sync=ps``).  :func:`split_overrides` separates overrides from
the other arguments of a command line; :func:`parse_override` turns one into (section, key, value).
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterable, Sequence
from typing import Any

from paratrain.errors import ConfigError


def suggest(name: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, or an empty string."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def is_override(arg: str) -> bool:
    """``--section.key[=value]``, or ``section.key=value`` without dashes (the Python API's form)."""
    name = arg.split("=", 1)[0]
    if arg.startswith("--"):
        return "." in name
    return not arg.startswith("-") and "=" in arg and "." in name


def split_overrides(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(overrides, other arguments): each override comes back as ``--section.key=value``.

    ``--section.key VALUE`` takes the next argument as its value; that argument may not start
    with ``--`` (so ``--train.deterministic --json`` is an error, not deterministic = "--json")."""
    overrides: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not is_override(arg):
            rest.append(arg)
        elif "=" in arg:
            overrides.append(arg)
        else:
            if i + 1 == len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override '{arg}' has no value; write {arg}=VALUE or {arg} VALUE")
            overrides.append(f"{arg}={args[i + 1]}")
            i += 1
        i += 1
    return overrides, rest


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse ``--section.key=value`` (leading dashes optional); value is a TOML literal."""
    body = text.lstrip("-")
    if "=" not in body or "." not in body.split("=", 1)[0]:
        raise ConfigError(f"override '{text}' must look like --section.key=value")
    path, raw = body.split("=", 1)
    section, key = path.split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: take it as a string (--parallel.sync=ps)
    return section, key, value


def toml_value(v: Any) -> str:
    """One scalar as a TOML literal (bool, int, float or string)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'
