"""The run record (launch/record/read.py): typed reads, versions, damaged files, and what the nodes refuse.

Every record here is written by the real CLI (`trainctl render`); damage is done to it by hand, as a
user or a failing disk would. The trainer is the real entry point (`python -m launch.train RUN_DIR`);
what is checked is what it says before it would build anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config.schema import BackendName, Recompute
from launch.record import outcome
from launch.record.outcome import Outcome
from launch.record.read import RECORD_VERSION, RecordError, read_backend_file, read_config, read_plan
from tests.conftest import PYTHONPATH, run_trainctl


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("record")
    out = run_trainctl("render", "recipe=tiny_local", "parallel.recompute=full", cwd=cwd)
    assert out.returncode == 0, out.stderr
    return cwd / "runs/tiny_local"


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / run_dir.name
    copy.parent.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(run_dir), str(copy)], check=True)
    return copy


def _trainer(run_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "RANK": "0"}
    return subprocess.run([sys.executable, "-m", "launch.train", str(run_dir)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_record_reads_back_typed(rendered):
    record, plan = read_config(rendered), read_plan(rendered)
    assert record.cfg.parallel.recompute is Recompute.full  # an enum, not the string "full"
    assert record.cfg.backend.name is BackendName.deepspeed
    assert record.derived.world_size == plan.world_size == 2
    assert plan.parallel.dp == record.derived.dp and plan.run.steps == record.derived.steps
    assert plan.record_version == RECORD_VERSION and plan.memory_gib.fits is True


def test_a_record_from_before_versions_still_reads(rendered, tmp_path):
    """A job requeued after an upgrade reads what the older trainctl wrote (no record_version: version 0)."""
    run_dir = _copy(rendered, tmp_path)
    data = json.loads((run_dir / "plan.json").read_text())
    del data["record_version"]
    (run_dir / "plan.json").write_text(json.dumps(data))
    assert read_plan(run_dir).record_version == 0


@pytest.mark.parametrize("damage, says", [
    (lambda d: d.pop("throughput"), "key throughput is missing"),
    (lambda d: d["parallel"].update(dp="two"), "key parallel.dp: expected int, found 'two'"),
    (lambda d: d.update(record_version=RECORD_VERSION + 1), "written by a newer trainctl"),
])
def test_a_damaged_plan_names_the_file_the_key_and_the_command(rendered, tmp_path, damage, says):
    run_dir = _copy(rendered, tmp_path)
    data = json.loads((run_dir / "plan.json").read_text())
    damage(data)
    (run_dir / "plan.json").write_text(json.dumps(data))
    with pytest.raises(RecordError) as exc:
        read_plan(run_dir)
    text = str(exc.value)
    assert f"{run_dir}/plan.json" in text and says in text
    assert "fix: write the run's records again: trainctl render recipe=tiny_local parallel.recompute=full" in text


@pytest.mark.parametrize("file, text, says", [
    ("plan.json", '{"world_size": 2,', "not valid JSON"),
    ("config.yaml", "train: [unclosed\n", "not valid YAML"),
    ("config.yaml", None, "key parallel.recompute"),
])
def test_status_and_the_trainer_say_one_line_for_a_damaged_record(rendered, tmp_path, file, text, says):
    run_dir = _copy(rendered, tmp_path)
    if text is None:  # a hand edit to a value the schema does not have
        text = (run_dir / file).read_text().replace("recompute: full", "recompute: sometimes")
    (run_dir / file).write_text(text)
    (run_dir / "job.json").write_text(json.dumps({"jobs": [{"job_id": "local:1", "scheduler": "local"}]}))
    status = run_trainctl("status", str(run_dir), cwd=tmp_path)
    trainer = _trainer(run_dir)
    for out in (status, trainer):
        assert out.returncode == 2, out.stdout + out.stderr
        assert "Traceback" not in out.stderr and f"{run_dir}/{file}" in out.stderr and says in out.stderr


def test_submit_writes_a_damaged_record_again(rendered, tmp_path):
    """`submit` (like `render`) is the command that re-creates the records: it replaces the damaged ones."""
    run_dir = _copy(rendered, tmp_path)
    (run_dir / "plan.json").write_text("{")
    out = run_trainctl("submit", "recipe=tiny_local", "parallel.recompute=full", "train.rank_check_s=1",
                       cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert read_plan(run_dir).world_size == 2


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_a_gpu_profile_without_cuda_stops_at_once(tmp_path):
    """cluster=h100 on this CPU machine: no silent training on the CPU, a message with the host and torch.

    Here torch is a CPU-only build: the virtualenv is wrong on every node, a configuration error that is not
    requeued (exit 2); a CUDA build that sees no device would be the node's fault (exit 4, requeued)."""
    import torch

    cpu_build = torch.version.cuda is None
    out = run_trainctl("render", "recipe=tiny_local", "cluster=h100", "cluster.nodes=1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    trainer = _trainer(tmp_path / "runs/tiny_local")
    assert trainer.returncode == (2 if cpu_build else 4), trainer.stderr
    assert "cluster.gpu.name=H100-SXM-80GB" in trainer.stderr and "sees no CUDA device on" in trainer.stderr
    assert "Traceback" not in trainer.stderr and not (tmp_path / "runs/tiny_local/checkpoints").exists()
    record = outcome.read(next((tmp_path / "runs/tiny_local/outcomes").glob("local-*.json")))
    assert record.outcome is (Outcome.config if cpu_build else Outcome.node) and record.rank == 0 and "sees no CUDA device on" in record.cause


@pytest.mark.parametrize("record", ['{"jobs": 3}', '{"jobs": [{}]}', '\xff'])
def test_a_damaged_job_record_says_so(rendered, tmp_path, record):
    run_dir = _copy(rendered, tmp_path)
    (run_dir / "job.json").write_bytes(record.encode("latin-1"))
    status = run_trainctl("status", str(run_dir), cwd=tmp_path)
    assert status.returncode == 2 and f"{run_dir}/job.json" in status.stderr and "Traceback" not in status.stderr


def test_a_damaged_backend_file_stops_the_trainer_with_one_line(rendered, tmp_path):
    run_dir = _copy(rendered, tmp_path)
    (run_dir / "ds_config.json").write_text("{")
    with pytest.raises(RecordError, match=r"ds_config\.json: not valid JSON"):
        read_backend_file(run_dir, "ds_config.json")
