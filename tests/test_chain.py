"""The whole chain on the local Slurm test cluster: pretrain -> SFT -> DPO -> GRPO, every stage training.

``recipe=tiny_slurm_pipeline``: pretraining on Megatron-Core, then SFT, DPO and GRPO on DeepSpeed (GRPO on
TRL), four jobs chained with ``afterok``, each starting from the previous stage's ``checkpoints/final``.
Only the GPUs are fake (2 CPU processes on one node per job). What a user would check, checked:
pretraining's and SFT's losses fall, DPO's reward margin rises and its loss ends below log 2, GRPO's mean
reward rises, and each stage started from exactly the weights the stage before exported (the fingerprint
its trainer recorded after loading equals the one the export wrote; ``launch.record.fingerprint``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tests.conftest import job_field, run_trainctl, wait_for

STAGES = ["pretrain", "sft", "dpo", "grpo"]


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_the_tiny_chain_trains_each_stage_from_the_one_before(workdir: Path, slurm_env: dict) -> None:
    assert run_trainctl("prepare", "recipe=tiny_slurm", cwd=workdir, env=slurm_env).returncode == 0
    out = run_trainctl("submit", "recipe=tiny_slurm_pipeline", cwd=workdir, env=slurm_env)
    assert out.returncode == 0, out.stderr
    top = workdir / "runs/tiny_slurm_pipeline"
    stages = json.loads((top / "pipeline.json").read_text())["stages"]
    assert [s["name"] for s in stages] == STAGES
    assert stages[3]["dependency"] == f"afterok:{stages[2]['job_id']}"
    for stage in stages:
        wait_for(lambda: job_field(slurm_env, stage["job_id"], "JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
                 900, f"stage {stage['name']} to end")
        log = next((top / stage["name"]).glob("slurm-*.log")).read_text()
        assert job_field(slurm_env, stage["job_id"], "JobState") == "COMPLETED", log[-3000:]
    status = run_trainctl("status", "runs/tiny_slurm_pipeline", cwd=workdir, env=slurm_env).stdout
    assert status.count("COMPLETED") == 4 and all(f"[{name}]" in status for name in STAGES), status

    runs = {name: top / name for name in STAGES}
    for name in ("pretrain", "sft"):
        losses = [r["loss"] for r in _records(runs[name], "train")]
        assert _mean(losses[-3:]) < _mean(losses[:3]) - 0.3, (name, losses)
    dpo = _records(runs["dpo"], "train")
    margins = [r["rewards/margins"] for r in dpo]
    assert _mean(margins[-3:]) > _mean(margins[:3]) + 0.1 and dpo[-1]["loss"] < math.log(2), [
        (r["loss"], r["rewards/margins"]) for r in dpo]
    rewards = [r["reward"] for r in _records(runs["grpo"], "train")]
    assert _mean(rewards[-5:]) > _mean(rewards[:5]), rewards

    for before, after in zip(STAGES, STAGES[1:]):
        final = runs[before] / "checkpoints/final"
        exported = json.loads((final / "trainctl.json").read_text())["weights_sha256"]
        init = _records(runs[after], "init")
        assert len(init) == 1 and init[0]["path"] == str(final), init
        assert exported and init[0]["weights_sha256"] == exported, (after, init, exported)
