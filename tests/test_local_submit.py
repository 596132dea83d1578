"""cluster=local: submit runs launch.sh (torchrun, 2 CPU ranks) in the foreground and records it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_trainctl


def test_local_submit_runs_in_the_foreground_and_records_its_exit(workdir: Path) -> None:
    out = run_trainctl("submit", "recipe=tiny_local", "train.rank_check_s=1", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert "rank check done: 2 rank(s)" in out.stdout + out.stderr and "finished local:" in out.stdout
    entry = json.loads((workdir / "runs/tiny_local/job.json").read_text())["jobs"][-1]
    assert entry["scheduler"] == "local" and entry["exit_code"] == 0
    status = run_trainctl("status", "runs/tiny_local", cwd=workdir)
    assert status.returncode == 0 and "COMPLETED" in status.stdout


def test_a_stale_record_of_a_dead_local_process_does_not_block(workdir: Path) -> None:
    assert run_trainctl("render", "recipe=tiny_local", cwd=workdir).returncode == 0
    run_dir = workdir / "runs/tiny_local"
    stale = {"jobs": [{"job_id": "local:4194000", "scheduler": "local", "script": "launch.sh",
                       "script_sha256": "", "submitted_utc": "2026-01-01T00:00:00+00:00", "dependency": None}]}
    (run_dir / "job.json").write_text(json.dumps(stale))  # as left by a process killed with SIGKILL
    assert "GONE" in run_trainctl("status", "runs/tiny_local", cwd=workdir).stdout
    out = run_trainctl("submit", "recipe=tiny_local", "train.rank_check_s=1", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert len(json.loads((run_dir / "job.json").read_text())["jobs"]) == 2


def test_a_failing_local_run_exits_2_and_records_its_code(workdir: Path) -> None:
    out = run_trainctl("submit", "recipe=tiny_local", "train.rank_check_s=1", "cluster.python=/bin/false",
                       cwd=workdir)
    assert out.returncode == 2 and "ended with exit code 1" in out.stderr and "Traceback" not in out.stderr
    entry = json.loads((workdir / "runs/tiny_local/job.json").read_text())["jobs"][-1]
    assert entry["exit_code"] == 1
