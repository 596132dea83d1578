"""Turn Hydra's and OmegaConf's composition errors into one-line user messages.

Hydra reports a misspelled key as "Could not override 'parallel.tpp'" and a
wrong type with an OmegaConf stack; a user wants the key, the value, and what
to type instead. The nearest valid key comes from the schema dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing

import yaml
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException, ValidationError

from launch.config.schema import Config


def explain(exc: BaseException, schema: type = Config) -> str | None:
    """A message for a composition error, or None if ``exc`` is not one.

    ``schema`` is the verb's config dataclass (``size`` has its own), where the
    nearest valid key and the expected type are looked up.
    """
    bad_yaml = next((e for e in _chain(exc) if isinstance(e, yaml.YAMLError)), None)
    if bad_yaml is not None:
        return _yaml_error(bad_yaml)
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        return _missing_option(exc)
    if isinstance(exc, OverrideParseException):
        return (f"cannot parse the override {exc.override!r}: {exc.message.splitlines()[0]}\n"
                "  fix: write KEY=VALUE (quote values with spaces or brackets), see "
                "https://hydra.cc/docs/advanced/override_grammar/basic/")
    cause = exc if isinstance(exc, OmegaConfBaseException) else exc.__cause__
    if cause is None and isinstance(exc, ConfigCompositionException):
        cause = exc.__context__  # a config file's value: Hydra re-raises OmegaConf's error without `from`
    if isinstance(cause, (ConfigKeyError, AttributeError)) and getattr(cause, "full_key", None):
        return unknown_key(cause.full_key, schema)
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        detail = str(cause).splitlines()[0]
        where = re.match(r"In '([^']+)'", str(exc)) if cause is not exc else None
        source = f" (in {where[1]}.yaml)" if where else ""
        return f"{cause.full_key}: {detail}{source}\n  fix: {_type_hint(cause.full_key, schema)}"
    if isinstance(cause, InterpolationResolutionError):
        key = getattr(cause, "full_key", None) or "a value"
        return (f"{key}: cannot resolve its interpolation: {str(cause).splitlines()[0]}\n"
                "  fix: set what it refers to (an environment variable for ${oc.env:...}), or give a plain value")
    if isinstance(exc, OSError) and exc.filename:
        return (f"{exc.filename}: {exc.strerror}\n"
                "  fix: run where you can write, or move the run directory with hydra.run.dir=... / hydra.sweep.dir=...")
    if str(exc).startswith("Config group override must be a string"):
        return ("a config group was set to null (e.g. recipe=null): a group takes one of its options\n"
                "  fix: leave the group out to keep its default, or name an option (trainctl plan --help lists them)")
    if isinstance(exc, OmegaConfBaseException) or _raised_in(exc, ("hydra.", "omegaconf.")):
        why = f": {str(exc.__cause__).splitlines()[0]}" if exc.__cause__ else ""
        return f"{str(exc).strip()}{why}\n  fix: check the overrides and config files named above"
    return None


def _chain(exc: BaseException | None):
    """``exc`` and the exceptions it was raised from or during."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _yaml_error(exc: yaml.YAMLError) -> str:
    """A config file that is not YAML: where (file, line, column) and what the parser expected."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else "a config file"
    what = ": ".join(filter(None, (getattr(exc, "context", None), getattr(exc, "problem", None)))) or str(exc)
    return (f"{where}: not valid YAML: {what}\n"
            "  fix: correct the file there (a list is [a, b]; quote a value that holds ': ' or ' #')")


def _raised_in(exc: BaseException, prefixes: tuple[str, ...]) -> bool:
    """Whether ``exc`` was raised by code in these packages (Hydra's argument checks raise ValueError)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb else ""
    return module.startswith(prefixes) or type(exc).__module__.startswith(prefixes)


def _missing_option(exc: MissingConfigException) -> str:
    group, _, option = exc.missing_cfg_file.rpartition("/")
    options = exc.options or []
    near = difflib.get_close_matches(option, options, n=1)
    guess = f"did you mean {group}={near[0]}? " if near else ""
    if not group:
        return f"no config named {option!r}\n  fix: {guess}check the spelling"
    return (f"{group}={option}: no such option in group '{group}'\n"
            f"  fix: {guess}options: {', '.join(options)}")


def unknown_key(full_key: str, schema: type = Config) -> str:
    parent, _, key = full_key.rpartition(".")
    node = _schema_at(parent, schema)
    if _is_mapping(node):
        if dataclasses.is_dataclass(typing.get_args(node)[1]):
            how = "new entries go in a config file of their own (README: your own cluster profile and recipes)"
        else:
            how = f"add a new entry with +{full_key}=VALUE"
        return f"{full_key}: '{parent}' has no entry '{key}'\n  fix: check the spelling; {how}"
    valid = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
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
    return [path for path, present in _compare(node, schema, prefix) if present]


def absent_keys(node: DictConfig, schema: type = Config, prefix: str = "") -> list[str]:
    """Schema keys a composed config lacks (``~train`` deletes a whole node)."""
    return [path for path, present in _compare(node, schema, prefix) if not present]


def _compare(node: DictConfig, schema: type, prefix: str) -> list[tuple[str, bool]]:
    """(path, True) for each key the schema lacks, (path, False) for each schema key the node lacks."""
    hints = typing.get_type_hints(schema)
    found = [(f"{prefix}{key}", False) for key in hints if key not in node]
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in hints:
            found.append((path, True))
            continue
        value = node._get_node(key)
        if not isinstance(value, DictConfig) or value._is_none() or value._is_missing():
            continue
        kind = _unwrap(hints[key])
        if dataclasses.is_dataclass(kind):
            found += _compare(value, kind, path + ".")
        elif typing.get_origin(kind) is dict and dataclasses.is_dataclass(item := typing.get_args(kind)[1]):
            for name in value.keys():
                found += _compare(value[name], item, f"{path}.{name}.")
    return found


def _unwrap(hint):
    """X for Optional[X]; anything else as it is."""
    if typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _is_mapping(hint) -> bool:
    return typing.get_origin(hint) is dict


def _schema_at(path: str, schema: type = Config):
    """The schema type at a dotted path: a dataclass, a ``Dict[str, X]`` hint, or None."""
    node: typing.Any = schema
    for part in filter(None, path.split(".")):
        if _is_mapping(node):
            node = typing.get_args(node)[1]
            continue
        if not dataclasses.is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = _unwrap(hints[part])
    return node


def _type_hint(full_key: str, schema: type = Config) -> str:
    parent, _, key = full_key.rpartition(".")
    node = _schema_at(parent, schema)
    if not dataclasses.is_dataclass(node) or key not in typing.get_type_hints(node):
        return "check the value's type"
    raw = typing.get_type_hints(node)[key]
    hint = _unwrap(raw)
    choices = getattr(hint, "__members__", None)
    if choices:
        return f"{full_key}=<one of {', '.join(choices)}>"
    name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    return f"{full_key} takes a value of type {name}" + (" or null" if raw is not hint else "")
