"""The outcome record (launch/record/outcome.py): one per job step, the first writer wins, damage is named.

The writers here are real processes racing on a real directory, as the ranks of a job
step that all fail at once are; the job script's side is in tests/test_sbatch.py.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from launch.errors import UserError
from launch.record import outcome
from launch.record.outcome import Outcome
from launch.verbs.status import last_outcome

SLURM = {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "2", "RANK": "5"}


def test_a_record_reads_back_with_what_the_script_and_status_need(tmp_path: Path) -> None:
    assert outcome.write(tmp_path, Outcome.crash, "RuntimeError: CUDA error\n  at line 3", step=40, env=SLURM)
    path = tmp_path / "outcomes/77.2.json"
    text = path.read_text()
    assert text.startswith('{"outcome": "crash", ') and text.endswith('"cause": "RuntimeError: CUDA error"}\n')
    r = outcome.read(path)
    assert (r.outcome, r.job, r.restart, r.rank, r.step, r.cause) == (Outcome.crash, "77", 2, 5, 40,
                                                                      "RuntimeError: CUDA error")
    assert outcome.last(tmp_path, "77") == path
    assert last_outcome(tmp_path, "77") == f"crash on {r.node} (rank 5, step 40): RuntimeError: CUDA error"


def test_an_array_task_and_a_local_run_have_their_own_names(tmp_path: Path) -> None:
    assert outcome.step_key({"SLURM_ARRAY_JOB_ID": "9", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "12"}) == "9_3.0"
    local = {"TORCHELASTIC_RUN_ID": "0f3a-x/../y"}
    assert outcome.step_key(local) == "local-0f3a-xy.0"  # nothing from the environment makes a path
    assert outcome.write(tmp_path, Outcome.done, "trained 6 steps", step=6, env=local)
    assert "done on" in last_outcome(tmp_path, "local:1234")


def test_the_latest_restart_of_the_asked_job_is_shown(tmp_path: Path) -> None:
    for restart, what in ((0, Outcome.stopped), (1, Outcome.node), (10, Outcome.done)):
        outcome.write(tmp_path, what, what.value, env={"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": str(restart)})
    outcome.write(tmp_path, Outcome.crash, "other job", env={"SLURM_JOB_ID": "55"})
    assert outcome.last(tmp_path, "5").name == "5.10.json"  # 10 after 1, not after 0 as text would sort
    assert outcome.last(tmp_path, "6") is None and outcome.last(tmp_path / "nowhere", "5") is None
    assert last_outcome(tmp_path, None) == ""


def _race(run_dir: str, rank: int, start) -> bool:
    start.wait()
    return outcome.write(Path(run_dir), Outcome.config, f"rank {rank} saw it",
                         env={"SLURM_JOB_ID": "8", "RANK": str(rank)})


def test_when_every_rank_fails_at_once_exactly_one_whole_record_lands(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    with ctx.Manager() as manager:
        start = manager.Event()
        with ctx.Pool(8) as pool:
            results = pool.starmap_async(_race, [(str(tmp_path), r, start) for r in range(16)])
            start.set()
            wins = results.get(timeout=60)
    assert sum(wins) == 1
    assert [p.name for p in (tmp_path / "outcomes").iterdir()] == ["8.0.json"]  # no temporary file left
    r = outcome.read(tmp_path / "outcomes/8.0.json")
    assert r.cause == f"rank {r.rank} saw it" and wins[r.rank]


@pytest.mark.parametrize("text", ["", "{", '{"outcome": "exploded"}', "[1]", '{"outcome": "done"}'])
def test_a_damaged_record_is_named_and_status_still_answers(tmp_path: Path, text: str) -> None:
    (tmp_path / "outcomes").mkdir()
    (tmp_path / "outcomes/3.0.json").write_text(text)
    with pytest.raises(UserError, match=r"outcomes/3.0.json: not an outcome record trainctl wrote"):
        outcome.read(tmp_path / "outcomes/3.0.json")
    assert last_outcome(tmp_path, "3") == "damaged record outcomes/3.0.json"


def test_a_record_that_cannot_be_written_does_not_hide_the_error(tmp_path: Path) -> None:
    (tmp_path / "outcomes").write_text("a file where the folder should be")
    assert outcome.write(tmp_path, Outcome.crash, "boom", env=SLURM) is False


def test_a_long_cause_is_one_short_line() -> None:
    line = outcome.first_line("\n\n  " + "x" * 1000 + "\nsecond")
    assert len(line) == 300 and line.endswith("...") and json.dumps(line).count("\\n") == 0
