"""Turn Hydra's and OmegaConf's composition errors into one-line user messages.

Hydra reports a misspelled key as "Could not override 'parallel.tpp'" and a
wrong type with an OmegaConf stack; a user wants the key, the value, and what
to type instead. The nearest valid key comes from the schema dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing

from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException, ValidationError

from launch.config.schema import Config


def explain(exc: BaseException) -> str | None:
    """A message for a composition error, or None if ``exc`` is not one."""
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        return _missing_option(exc)
    if isinstance(exc, OverrideParseException):
        return (f"cannot parse the override {exc.override!r}: {exc.message.splitlines()[0]}\n"
                "  fix: write KEY=VALUE (quote values with spaces or brackets), see "
                "https://hydra.cc/docs/advanced/override_grammar/basic/")
    cause = exc if isinstance(exc, OmegaConfBaseException) else exc.__cause__
    if isinstance(cause, (ConfigKeyError, AttributeError)) and getattr(cause, "full_key", None):
        return unknown_key(cause.full_key)
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        detail = str(cause).splitlines()[0]
        return f"{cause.full_key}: {detail}\n  fix: {_type_hint(cause.full_key)}"
    if isinstance(cause, InterpolationResolutionError):
        key = getattr(cause, "full_key", None) or "a value"
        return (f"{key}: cannot resolve its interpolation: {str(cause).splitlines()[0]}\n"
                "  fix: set what it refers to (an environment variable for ${oc.env:...}), or give a plain value")
    if isinstance(exc, OmegaConfBaseException) or type(exc).__module__.startswith("hydra"):
        return f"{str(exc).strip()}\n  fix: check the overrides and config files named above"
    return None


def _missing_option(exc: MissingConfigException) -> str:
    group, _, option = exc.missing_cfg_file.rpartition("/")
    options = exc.options or []
    near = difflib.get_close_matches(option, options, n=1)
    guess = f"did you mean {group}={near[0]}? " if near else ""
    if not group:
        return f"no config named {option!r}\n  fix: {guess}check the spelling"
    return (f"{group}={option}: no such option in group '{group}'\n"
            f"  fix: {guess}options: {', '.join(options)}")


def unknown_key(full_key: str) -> str:
    parent, _, key = full_key.rpartition(".")
    node = _schema_at(parent)
    if node is dict:
        return (f"{full_key}: '{parent}' has no entry '{key}'\n"
                f"  fix: check the spelling; new entries go in a config file of their own "
                f"(see the README: adding your own configs)")
    valid = [f.name for f in dataclasses.fields(node)] if node else []
    near = difflib.get_close_matches(key, valid, n=1)
    where = parent or "the top level"
    guess = f"did you mean {parent + '.' if parent else ''}{near[0]}? " if near else ""
    return f"{full_key}: no such key in {where}\n  fix: {guess}valid keys: {', '.join(valid)}"


def extra_keys(node: DictConfig, schema: type = Config, prefix: str = "") -> list[str]:
    """Keys in a composed config that the schema lacks.

    Hydra lets ``+parallel.foo=1`` force a key into a typed node, and
    ``OmegaConf.to_object`` then drops it without a word; a user who typed it
    must hear that it does nothing.
    """
    hints = typing.get_type_hints(schema)
    found = []
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in hints:
            found.append(path)
            continue
        value = node._get_node(key)
        if not isinstance(value, DictConfig) or value._is_none() or value._is_missing():
            continue
        kind = _unwrap(hints[key])
        if dataclasses.is_dataclass(kind):
            found += extra_keys(value, kind, path + ".")
        elif typing.get_origin(kind) is dict and dataclasses.is_dataclass(item := typing.get_args(kind)[1]):
            for name in value.keys():
                found += extra_keys(value[name], item, f"{path}.{name}.")
    return found


def _unwrap(hint):
    """X for Optional[X]; anything else as it is."""
    if typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _schema_at(path: str):
    """The dataclass (or ``dict`` for free-form mappings) at a dotted path of the schema."""
    node: typing.Any = Config
    for part in filter(None, path.split(".")):
        if node is dict or not dataclasses.is_dataclass(node):
            return dict
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = _unwrap(hints[part])
        if typing.get_origin(node) is dict:
            node = dict
    return node


def _type_hint(full_key: str) -> str:
    parent, _, key = full_key.rpartition(".")
    node = _schema_at(parent)
    if not node or node is dict:
        return "check the value's type"
    hint = typing.get_type_hints(node).get(key)
    if hint is None:
        return "check the value's type"
    choices = getattr(hint, "__members__", None)
    if choices:
        return f"{full_key}=<one of {', '.join(choices)}>"
    name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    return f"{full_key} takes a value of type {name}"
