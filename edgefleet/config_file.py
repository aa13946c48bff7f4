"""YAML config files for the daemons: the same keys as their flags.

``edgefleet node`` reads ``--config PATH``, else ``$EDGEFLEET_CONFIG``, else
``/etc/edgefleet/node.yaml`` when that file exists (``coordinator.yaml`` for
the coordinator); ``--config none`` reads no file. A key is a flag's name
without ``--`` (``gpu-layers`` or ``gpu_layers``); each value is checked
against the flag (its type and choices), and a mistake stops the daemon with
one line naming the file and the key.

Precedence: flags > environment (``EDGEFLEET_*``) > config file > defaults.
The file's values become the parser's defaults, except where the flag's
environment variable is set, so flags still beat both.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path

CONFIG_ENV = "EDGEFLEET_CONFIG"
NO_FILE = "none"
MAX_BYTES = 1 << 20  # a config file is a page of settings, never a megabyte


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file (and key)."""


# -- reading ---------------------------------------------------------------------------


def read(path: Path | str) -> dict:
    """The YAML mapping in ``path`` (an empty file is an empty mapping)."""
    import yaml

    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it: {error.strerror or error}") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_BYTES // 1024} KiB; not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_loader())  # a SafeLoader
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected 'key: value' lines at the top level, got {_kind(data)}"
        )
    return data


@functools.cache
def _loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """Safe YAML that refuses a key given twice (the second would silently win)."""

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: construct_mapping says so
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def write(path: Path | str, values: Mapping[str, object]) -> None:
    """Write ``values`` (key -> value) as a YAML config file."""
    import yaml

    Path(path).write_text(yaml.safe_dump(dict(values), sort_keys=False))


# -- keys of a parser -------------------------------------------------------------------


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The keys a config file may set for ``parser``: each ``--flag`` (its long
    name without dashes) and the action behind it."""
    found = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config", "version"):
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs:
            found[max(longs, key=len)[2:]] = action
    return found


def normal_key(key: object) -> str:
    return str(key).strip().replace("_", "-")


def lookup(known: Mapping[str, argparse.Action], key: object, source: str) -> str:
    """``key`` as ``known`` spells it, or a ConfigError with the closest key."""
    if not isinstance(key, str):
        raise ConfigError(f"{source}: key {key!r} is not a name (keys are flag names)")
    name = normal_key(key)
    if name in known:
        return name
    hint = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise ConfigError(f"{source}: unknown key '{key}'{suggestion}")


def convert(action: argparse.Action, key: str, value: object, source: str) -> object:
    """``value`` from YAML checked against the flag behind ``action``, in the
    form argparse would have produced from the command line."""
    where = f"{source}: {key}"
    if value is None:
        raise ConfigError(f"{where}: has no value (give one, or remove the key)")
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_shown(value)}")
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_scalar(action, f"{where}[{i}]", item) for i, item in enumerate(items)]
    if isinstance(value, list) and getattr(action, "many", False):
        if not value:
            return ""
        return ",".join(str(_scalar(action, f"{where}[{i}]", v)) for i, v in enumerate(value))
    return _scalar(action, where, value)


def _scalar(action: argparse.Action, where: str, value: object) -> object:
    kind = action.type
    if isinstance(value, (dict, list)):
        many = " or a list" if getattr(action, "many", False) else ""
        raise ConfigError(f"{where}: expected a single value{many}, got {_kind(value)}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {_shown(value)}")
        converted: object = value
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_shown(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value}")
        converted = float(value)
    elif isinstance(value, bool):
        raise ConfigError(
            f"{where}: expected text, got {str(value).lower()} "
            "(YAML reads bare yes/no/on/off/true/false as booleans: quote the word)"
        )
    elif kind in (None, str):
        converted = value if isinstance(value, str) else str(value)
    else:
        try:
            converted = kind(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            raise ConfigError(f"{where}: {error}") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(str(c) for c in action.choices)
        raise ConfigError(f"{where}: {value!r} is not one of {choices}")
    return converted


def convert_all(
    known: Mapping[str, argparse.Action], data: Mapping, source: str
) -> dict[str, object]:
    """Every key of ``data`` checked: ``{flag name: value}``."""
    values: dict[str, object] = {}
    spelled: dict[str, object] = {}
    for key, value in data.items():
        name = lookup(known, key, source)
        if name in values:
            raise ConfigError(f"{source}: '{spelled[name]}' and '{key}' set the same key")
        values[name] = convert(known[name], str(key), value, source)
        spelled[name] = key
    return values


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return _shown(value)


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"the text {value!r}"
    return repr(value)


# -- the daemons' --config --------------------------------------------------------------


def env_is_set(action: argparse.Action) -> bool:
    name = getattr(action, "env", None)
    return bool(name) and name in os.environ


def defaults_from(
    parser: argparse.ArgumentParser, path: Path | str
) -> tuple[dict[str, object], list[str]]:
    """The parser defaults a config file gives: ``({dest: value}, keys left to
    the environment)``; a ConfigError when the file cannot be used."""
    known = options(parser)
    values = convert_all(known, read(path), str(path))
    defaults, shadowed = {}, []
    for name, value in values.items():
        action = known[name]
        if env_is_set(action):
            shadowed.append(name)
        else:
            defaults[action.dest] = value
    return defaults, shadowed


class ConfigFileParser(argparse.ArgumentParser):
    """A (sub)command parser that reads its ``--config`` file first and takes the
    file's values as defaults, so the command line and the environment win."""

    config_default: str = ""

    def parse_known_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        wants_help = any(a in ("-h", "--help") for a in argv)
        path, origin = (None, "") if wants_help else self._config_path(argv)
        if path is not None:
            try:
                defaults, _ = defaults_from(self, path)
            except ConfigError as error:
                self.exit(2, f"{self.prog}: error: {error}{origin}\n")
            self.set_defaults(**defaults)
        parsed, extras = super().parse_known_args(argv, namespace)
        given = getattr(parsed, "config", None)
        if given not in (None, NO_FILE) and str(given) != str(path):
            # argparse took an abbreviation (--conf) that the first look missed.
            self.exit(2, f"{self.prog}: error: write --config in full\n")
        if path is not None:
            parsed.config = str(path)
        return parsed, extras

    def _config_path(self, argv: list[str]) -> tuple[str | None, str]:
        """The file to read (None: none), and where its name came from."""
        first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        first.add_argument("--config")
        try:
            found, _ = first.parse_known_args(argv)
        except SystemExit:  # --config without a value: the real parse says so
            return None, ""
        if found.config is not None:
            explicit, origin = found.config, ""
        else:
            explicit, origin = os.environ.get(CONFIG_ENV), f" (named by ${CONFIG_ENV})"
        if explicit is not None:
            explicit = explicit.strip()
            return (None, "") if explicit in ("", NO_FILE) else (explicit, origin)
        if self.config_default and os.path.exists(self.config_default):
            return self.config_default, ""
        return None, ""


def add_config(parser: argparse.ArgumentParser, default_path: str) -> None:
    """Give a daemon's parser ``--config`` (see the module's docstring)."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help=f"YAML file with the same keys as these flags (env {CONFIG_ENV}; default "
        f"{default_path} when it exists; 'none': no file). Flags and env beat it",
    )
    if type(parser) is argparse.ArgumentParser:
        parser.__class__ = ConfigFileParser
    parser.config_default = default_path
