"""The RL stage for real: TRL's GRPOTrainer and RLOOTrainer on 2 CPU ranks (gloo) under torchrun, DeepSpeed
ZeRO-3, completions from transformers' generate, the tiny_grpo recipe (random weights, the shipped sums).

One GRPO run is stopped by SIGUSR1 (through torchrun, as the sbatch script delivers it) after a few
steps, resumed, and finishes; the tests read what it left: the outcome records, the committed
checkpoints, the metrics (the mean reward rises) and the exported model. Nothing is mocked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from launch.record import outcome
from launch.record.outcome import Outcome
from tests.conftest import records as _records
from tests.conftest import run_trainctl, stop_after, torchrun, train, trainer_env

STEPS = 9
STOP_AFTER = 3  # train records seen before SIGUSR1: the stop lands at step >= 3


def _env() -> dict:
    return trainer_env(WANDB_MODE="disabled")


def _torchrun(run_dir: Path, ranks: int = 2):
    return torchrun(run_dir, ranks, _env())


def _render(cwd: Path, *extra: str) -> Path:
    # The recipe's 30 steps cut to 9; one warmup step (the recipe's two delay the rise by a step)
    out = run_trainctl("render", "recipe=tiny_grpo", f"train.steps={STEPS}", "train.checkpoint_interval=100",
                       "optim.warmup_steps=1", *extra, cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    return cwd / "runs/tiny_grpo"


def _outcomes(run_dir: Path) -> list[outcome.Record]:
    return sorted((outcome.read(f) for f in (run_dir / "outcomes").iterdir()), key=lambda r: r.step or 0)


@pytest.fixture(scope="module")
def grpo(tmp_path_factory) -> dict:
    """A GRPO run stopped by SIGUSR1 after a few steps, then resumed to the end."""
    cwd = tmp_path_factory.mktemp("grpo")
    run_dir = _render(cwd)
    out1 = stop_after(run_dir, after=STOP_AFTER, env=_env())
    out2 = train(run_dir, env=_env(), timeout=300)
    return {"run_dir": run_dir, "out1": out1, "out2": out2}


@pytest.mark.slow  # minutes of training: `pytest -m slow`
def test_sigusr1_saves_a_checkpoint_and_the_resume_continues_at_its_step(grpo):
    run_dir, out1, out2 = grpo["run_dir"], grpo["out1"], grpo["out2"]
    stopped, done = _outcomes(run_dir)
    assert (stopped.outcome, done.outcome) == (Outcome.stopped, Outcome.done), (stopped, done)
    assert STOP_AFTER <= stopped.step < STEPS and "SIGUSR1" in stopped.cause, stopped
    saved = run_dir / "checkpoints" / f"step_{stopped.step:07d}"
    marker = json.loads((saved / "trainctl.json").read_text())  # our commit: marker with its manifest
    assert marker["step"] == stopped.step and "rng_rank1.pt" in marker["manifest"]["files"], marker.keys()
    assert f"stopped by SIGUSR1 at step {stopped.step}, checkpoint saved" in out1, out1[-3000:]
    assert f"resumed from {saved}: step {stopped.step}" in out2, out2[-3000:]
    steps = [r["step"] for r in _records(run_dir)]  # one continuous curve: each step once, none skipped
    assert steps == list(range(1, STEPS + 1)), steps
    assert done.step == STEPS and (run_dir / "checkpoints/latest").read_text().strip() == f"step_{STEPS:07d}"
    assert not list((run_dir / "checkpoints").glob(".tmp_*"))  # nothing half-committed left behind


@pytest.mark.slow  # minutes of training: `pytest -m slow`
def test_grpo_mean_reward_rises(grpo):
    """From random weights: the digits reward (share of digit characters) varies within each group from step 1,
    so GRPO's advantages are not all zero and the policy moves toward digits."""
    rewards = [r["reward"] for r in _records(grpo["run_dir"])]
    before, after = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"mean reward: first 3 steps {before:.4f}, last 3 steps {after:.4f}")
    assert after > before + 0.1, rewards
    first = _records(grpo["run_dir"])[0]
    assert first["reward_std"] > 0 and {"reward_digits", "reward_format", "reward_exact_match"} <= first.keys()


@pytest.mark.slow  # minutes of training: `pytest -m slow`
def test_final_is_the_trained_hugging_face_model(grpo):
    from safetensors.numpy import load_file

    final, init = grpo["run_dir"] / "checkpoints/final", grpo["run_dir"] / "rl_init"
    assert json.loads((final / "trainctl.json").read_text())["step"] == STEPS
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in final.iterdir()}
    trained, start = load_file(final / "model.safetensors"), load_file(init / "model.safetensors")
    assert trained.keys() == start.keys() and all(trained[k].shape == start[k].shape for k in start)
    assert abs(trained["lm_head.weight"] - start["lm_head.weight"]).max() > 1e-3  # trained, not the init


@pytest.mark.slow  # minutes of training: `pytest -m slow`
def test_rloo_trains(tmp_path):
    """One rank (the CI machine's two cores are the fixture's): one group of 8 completions per step."""
    run_dir = _render(tmp_path, "stage.rl_algorithm=rloo", "train.steps=2", "cluster.gpus_per_node=1",
                      "train.global_batch_size=8")
    proc = _torchrun(run_dir, ranks=1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-5000:]
    assert "(RLOO, TRL" in out
    (done,) = _outcomes(run_dir)
    assert done.outcome is Outcome.done and done.step == 2
    assert [r["step"] for r in _records(run_dir)] == [1, 2] and (run_dir / "checkpoints/final/config.json").is_file()


# --- the login node's checks (no torch) --------------------------------------------------------

def test_a_bad_reward_name_is_refused_at_submit(tmp_path):
    out = run_trainctl("submit", "recipe=tiny_grpo", "stage.rewards=[digits,exact_matc]", cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "stage.rewards[1]=exact_matc" in out.stderr and "fix:" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("launch.sh"))


def test_reward_paths_resolve_without_importing_them(tmp_path):
    from launch.config.rl_check import reward_problem

    (tmp_path / "myrewards.py").write_text("import torch\n\ndef length(completions, **kw):\n    return []\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert reward_problem("myrewards:length") is None  # found by reading its source: torch never imported
        assert "defines no lenght" in reward_problem("myrewards:lenght")
        assert "no module" in reward_problem("nosuchmodule_xyz:f")
        assert "not a shipped reward" in reward_problem("exact")
    finally:
        sys.path.remove(str(tmp_path))


def test_prompts_without_the_answer_exact_match_needs_are_refused_at_submit(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": "2"}) + "\n"
                    + json.dumps({"prompt": "What is 2 + 2?"}) + "\n")
    out = run_trainctl("submit", "recipe=tiny_grpo", f"data.sources.sums.path={data}", cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "line 2 has no 'answer' field" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_the_shipped_rewards():
    from launch.train.rewards import digits, exact_match, extracted_answer
    from launch.train.rewards import format as format_reward

    completions = ["Answer: 7.", "I think 7", "answer: 8", "no idea"]
    assert exact_match(completions, answer=["7"] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert format_reward(completions) == [1.0, 0.0, 1.0, 0.0]
    assert digits(["12ab", ""]) == [0.5, 0.0]
    assert extracted_answer("Answer: 3\nAnswer: 42 \nbye") == "42 "
