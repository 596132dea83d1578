"""Calibration enters the estimator as data: the file is read once at the verb's edge, never inside a model.

Python's audit hooks (PEP 578) see every ``open`` this process makes, so the
tests count real file opens rather than replacing anything.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest

from launch.config import derive
from launch.config.compose import compose, compose_config
from launch.estimate import UNCALIBRATED, estimate
from launch.estimate.calibration import Calibration, load_calibration
from launch.verbs.plan import make_plan
from launch.verbs.tune import search

_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], (str, Path)):
        _opened.append(str(args[0]))


sys.addaudithook(_audit)  # cannot be removed; it records only inside files_opened()


@contextlib.contextmanager
def files_opened():
    """The paths this process opens inside the block."""
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


RECIPE = "recipe=llama3_70b_pretrain_h100"


@pytest.fixture
def calibration_file(tmp_path: Path) -> Path:
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"cluster": "h100", "step_time_ratio": 1.25, "memory_ratio": 1.1}))
    return path


def test_estimate_takes_the_ratios_as_data_and_opens_no_file(calibration_file: Path):
    with_file = compose_config([RECIPE, f"cluster.calibration={calibration_file}"])
    plain = compose_config([RECIPE])
    ratios = Calibration(step_time_ratio=1.25, memory_ratio=1.1)
    expected = estimate(with_file, derive(with_file), load_calibration(with_file))
    estimate(plain, derive(plain), ratios)  # warm: any first-use import happens outside the count
    with files_opened() as opened:
        got = estimate(plain, derive(plain), ratios)
        bare = estimate(with_file, derive(with_file))  # cluster.calibration set, no Calibration: the bare model
    assert opened == []
    assert got == expected
    assert bare == estimate(plain, derive(plain), UNCALIBRATED) != got


def test_a_plan_reads_the_calibration_file_once(calibration_file: Path):
    composed = compose([RECIPE, f"cluster.calibration={calibration_file}"])
    with files_opened() as opened:
        plan = make_plan(composed)
    assert opened.count(str(calibration_file)) == 1
    assert plan.calibration == Calibration(step_time_ratio=1.25, memory_ratio=1.1, path=str(calibration_file))


def test_a_search_reads_the_calibration_file_once(calibration_file: Path):
    cfg = compose_config(["recipe=llama3_8b_pretrain_h100", "cluster.nodes=1", f"cluster.calibration={calibration_file}"])
    with files_opened() as opened:
        found = search(cfg)
    assert opened.count(str(calibration_file)) == 1 and found.ranked
    assert found.calibration.step_time_ratio == 1.25


def test_calibration_is_frozen():
    with pytest.raises(AttributeError):
        UNCALIBRATED.step_time_ratio = 2.0  # type: ignore[misc]
