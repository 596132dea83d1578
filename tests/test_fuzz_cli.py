"""Every key of the schema, given values nobody should type, through the command line in this process.

For each leaf key of ``launch.config.schema.Config`` the values are generated from its type (huge,
negative, zero, NaN, infinite, the wrong type, empty, unicode, shell metacharacters) and given to
``trainctl plan`` (and, for a sample, ``render`` and ``tune``) as one override on the tiny recipe. Each
must end in exit 0 or 2, never in a traceback, with nothing written on 2 and no shell command run. The
CLI runs in-process (``launch.cli.main``): a subprocess per case would cost a second each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import os
import typing
from pathlib import Path

import pytest

from launch.cli import main
from launch.config.schema import Config

PWNED = "trainctl_fuzz_pwned"
NUMBERS = ["-1", "0", str(2 ** 70), "-1e308", "nan", "inf", "abc", "''", "1.5"]
TEXTS = ["''", "'ü漢字 é'", f"'$(touch {PWNED})'", f"'a;touch {PWNED};`touch {PWNED}`'", "'\"'", "'x\\ny'"]
OTHERS = ["''", "nope", "[1,2]", "{a: 1}", "null"]
EXEMPT = {"pipeline"}
"""A pipeline's stages are configs of their own (tests/test_pipeline_*)."""


def _leaves(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, object]]:
    """(dotted key, type) of every leaf of the schema, optionals unwrapped."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        if key in EXEMPT:
            continue
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) \
            if typing.get_origin(hint) is typing.Union else hint
        if dataclasses.is_dataclass(base):
            yield from _leaves(base, key + ".")
        else:
            yield key, base


def _values(kind) -> list[str]:
    origin = typing.get_origin(kind)
    if kind in (int, float):
        return NUMBERS
    if kind is bool:
        return ["maybe", "2", "''"]
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return ["nope", "''", "1"]
    if origin in (list, dict):
        return ["x", "[1,2]", "{a: 1}", "[]", f"['$(touch {PWNED})']"]
    if kind is str:
        return TEXTS
    return OTHERS


CASES = [(key, value) for key, kind in _leaves(Config) for value in _values(kind)]


def _cli(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # Hydra's own exits (--help and friends) count as exit codes too
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue() + err.getvalue()


@pytest.fixture(scope="module")
def here(tmp_path_factory) -> Path:
    """Run from an empty directory (a `touch` that ran would leave its file here)."""
    where = tmp_path_factory.mktemp("fuzz")
    before = os.getcwd()
    os.chdir(where)
    yield where
    os.chdir(before)


def _check(here: Path, verb: str, key: str, value: str) -> None:
    run_dir = here / "runs" / "fuzz"
    code, text = _cli(verb, "recipe=tiny_local", f"{key}={value}", f"hydra.run.dir={run_dir}")
    assert code in (0, 2), (code, text[-3000:])
    assert "Traceback" not in text, text[-3000:]
    if code == 2:
        assert not run_dir.exists(), f"exit 2 left {sorted(p.name for p in run_dir.iterdir())}"
        assert "trainctl: error:" in text, text[-2000:]
    assert not list(here.glob(f"**/{PWNED}*")), "a value ran as a shell command"


def test_every_key_of_the_schema_has_generated_values():
    keys = {key for key, _ in CASES}
    assert {"parallel.tp", "optim.beta2", "cluster.partition", "cluster.setup", "stage.kind", "data.sources"} <= keys
    assert len(CASES) > 1000


@pytest.mark.parametrize("every", [pytest.param(6, id="every-sixth"), pytest.param(1, id="all", marks=pytest.mark.slow)])
def test_plan_meets_the_generated_values_with_exit_0_or_2(here: Path, every: int):
    """``plan`` with each (key, value), one override at a time: every sixth case in CI (~0.3 s a case: Hydra's
    composition), all of them with ``pytest -m slow``."""
    failures = []
    for key, value in CASES[::every]:
        try:
            _check(here, "plan", key, value)
        except AssertionError as exc:
            failures.append(f"{key}={value}: {str(exc)[:800]}")
        finally:
            _clean(here)
    assert not failures, f"{len(failures)} of {len(CASES[::every])}:\n" + "\n".join(failures[:20])


@pytest.mark.parametrize("verb", ["render", "tune"])
def test_render_and_tune_meet_a_sample_with_exit_0_or_2(here: Path, verb: str):
    """Every 17th case (render writes the job script and plan.png; tune searches layouts)."""
    failures = []
    for key, value in CASES[1::17]:
        try:
            _check(here, verb, key, value)
        except AssertionError as exc:
            failures.append(f"{key}={value}: {str(exc)[:800]}")
        finally:
            _clean(here)
    assert not failures, f"{len(failures)}:\n" + "\n".join(failures[:20])


def _clean(here: Path) -> None:
    import shutil

    shutil.rmtree(here / "runs", ignore_errors=True)
