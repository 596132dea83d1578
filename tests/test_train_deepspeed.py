"""The DeepSpeed trainer, for real: 2 CPU ranks over gloo under torchrun, ZeRO-3, the tiny_local recipe.

Until `trainctl prepare` is in every checkout, the shards are written here with
megatron-core's IndexedDatasetBuilder (launch.train.data.write_shards: the same
layout). One run is stopped by SIGUSR1 (through torchrun, as the sbatch script
delivers it), resumed, and finishes; the tests after it read what that run left.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.record import outcome
from launch.record.outcome import Outcome
from tests.conftest import ROOT, run_trainctl, torchrun as _torchrun, trainer_env as _env
from tests.conftest import records as _records

STEPS = 14
TOKENIZER = str(ROOT / "data/sample/tokenizer.json")
def _render(cwd: Path, prepared: Path, *extra: str) -> Path:
    out = run_trainctl("render", "recipe=tiny_local", f"data.prepared_dir={prepared}", f"train.steps={STEPS}",
                       "train.checkpoint_interval=4", "train.eval_interval=7", *extra, cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    return cwd / "runs/tiny_local"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared) -> dict:
    """A run stopped by SIGUSR1 after a few steps, then resumed to the end: (run_dir, both outputs)."""
    cwd = tmp_path_factory.mktemp("work")
    run_dir = _render(cwd, prepared)
    first = _torchrun(run_dir)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and first.poll() is None:
        if len(_records(run_dir)) >= 5:
            first.send_signal(signal.SIGUSR1)
            break
        time.sleep(0.2)
    out1, _ = first.communicate(timeout=120)
    second = _torchrun(run_dir)
    out2, _ = second.communicate(timeout=240)
    assert second.returncode == 0, out2[-5000:]
    return {"run_dir": run_dir, "out1": out1, "out2": out2, "cwd": cwd, "prepared": prepared}


# --- pure parts -------------------------------------------------------------------------------

def test_lr_schedule_warmup_cosine_and_wsd():
    from launch.train.schedule import lr_at

    cos = [lr_at(s, peak=1.0, min_lr=0.1, warmup=5, steps=20, schedule="cosine") for s in range(25)]
    assert cos[0] == pytest.approx(0.2) and cos[4] == pytest.approx(1.0) and cos[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(cos[5:20], cos[6:20]))  # decays monotonically
    assert cos[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert cos[20:] == [0.1] * 5  # past the end (a run extended later resumes on the new total)
    wsd = [lr_at(s, peak=1.0, min_lr=0.0, warmup=2, steps=10, schedule="wsd", decay_steps=4) for s in range(10)]
    assert wsd == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25])


def test_config_diff_names_keys_and_ignores_the_run_length():
    from launch.config.resume import config_diff

    saved = {"name": "a", "optim": {"lr": 1e-3}, "train": {"steps": 10, "seed": 1},
             "cluster": {"nodes": 1, "time_limit": "01:00:00"}, "data": {"prepared_dir": "/x"}}
    same = {"name": "b", "optim": {"lr": 1e-3}, "train": {"steps": 99, "seed": 1},
            "cluster": {"nodes": 1, "time_limit": "04:00:00"}, "data": {"prepared_dir": "/y"}}
    assert config_diff(saved, same) == []
    changed = {**same, "optim": {"lr": 5e-4}, "cluster": {"nodes": 2, "time_limit": "01:00:00"}}
    assert config_diff(saved, changed) == ["cluster.nodes: 1 -> 2", "optim.lr: 0.001 -> 0.0005"]


def test_resume_marks_the_records_of_lost_work(tmp_path):
    """A job killed at step 6 after a checkpoint at 4 logged steps 5-6 twice once resumed: the first copies
    stay in the file, marked, and the train curve has each step once."""
    from launch.estimate import UNCALIBRATED
    from launch.verbs.plan import plan_numbers
    from launch.record.read import parse_plan
    from launch.train.metrics import Reporter
    from tests.conftest import typed

    cfg, d = typed("wandb.mode=disabled")
    plan = parse_plan(plan_numbers(cfg, d, UNCALIBRATED))
    lost = [{"kind": "train", "step": s, "loss": 9.0 - s} for s in range(1, 7)] + [{"kind": "eval", "step": 5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lost))
    report = Reporter(tmp_path, cfg, plan, world=1, enabled=True)
    assert report.rewind(4) == 3
    report.train_step(step=5, loss=3.5, lr=1e-3, grad_norm=1.0, steps=6, step_time_s=1.0, tokens=10,
                      consumed_samples=40)
    report.close()
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records[-1]["loss"] == 3.5
    assert [r["step"] for r in _records(tmp_path, "discarded_train")] == [5, 6]
    assert len(_records(tmp_path, "discarded_eval")) == 1


def test_realised_mixture_is_exactly_the_weights(prepared, tmp_path):
    """megatron's blended index: weights 0.7/0.3 give 700/300 of the first 1,000 samples."""
    import numpy as np
    from omegaconf import OmegaConf

    from launch.config.schema import StageKind
    from launch.train.data import build_datasets

    cfg = OmegaConf.create({
        "data": {"prepared_dir": str(prepared), "tokenizer": TOKENIZER, "split": [0.9, 0.05, 0.05],
                 "sources": {"prose": {"weight": 0.7}, "code": {"weight": 0.3}}},
        "model": {"seq_length": 64}, "train": {"seed": 1234}, "stage": {"kind": StageKind.pretrain}})
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)  # megatron's caching needs one
    try:
        data = build_datasets(cfg, train_samples=1000, valid_samples=16, cache_dir=tmp_path / "cache")
    finally:
        dist.destroy_process_group()
    counts = np.bincount(np.asarray(data.train.dataset_index[:1000]), minlength=2)
    assert counts.tolist() == [700, 300]
    item = data.train[0]
    assert item["tokens"].shape == (64,) and (item["tokens"][1:] == item["labels"][:-1]).all()


def test_missing_shards_say_run_prepare(tmp_path):
    run_dir = _render(tmp_path, tmp_path / "nowhere")
    out = subprocess.run([sys.executable, "-m", "launch.train", str(run_dir)], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "run `trainctl prepare" in out.stderr and "prose.bin" in out.stderr
    (record,) = [outcome.read(f) for f in (run_dir / "outcomes").iterdir()]  # a record of what the job script
    assert record.outcome is Outcome.config and "prose.bin" in record.cause  # must not requeue


# --- the real run -----------------------------------------------------------------------------

def test_the_stopped_and_the_finished_run_each_record_their_outcome(trained):
    """Two local launches (torchrun --standalone: a run id each), two records; rank 0 wrote both."""
    records = sorted((outcome.read(f) for f in (trained["run_dir"] / "outcomes").iterdir()), key=lambda r: r.step)
    assert [r.outcome for r in records] == [Outcome.stopped, Outcome.done], records
    assert records[0].cause.startswith("stopped by SIGUSR1 at step") and records[0].step < STEPS
    assert records[1].step == STEPS and records[1].job == "local" and {r.rank for r in records} == {0}


def test_sigusr1_saves_a_checkpoint_and_stops(trained):
    out1, run_dir = trained["out1"], trained["run_dir"]
    assert "stopped by SIGUSR1 at step" in out1 and "checkpoint saved" in out1, out1[-3000:]
    stopped_at = int(out1.split("stopped by SIGUSR1 at step ")[1].split(",")[0])
    assert 5 <= stopped_at < STEPS
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:07d}'}: step {stopped_at}" in trained["out2"]


def test_training_resumes_and_the_loss_falls(trained):
    run_dir = trained["run_dir"]
    records = _records(run_dir)
    steps = [r["step"] for r in records]
    assert steps == list(range(1, STEPS + 1)), steps  # no step lost or repeated across the stop
    first, last = records[0], records[-1]
    assert last["loss"] < first["loss"] - 1.0, (first["loss"], last["loss"])
    assert last["consumed_samples"] == STEPS * 8
    for key in ("lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_memory_gib", "plan_mfu",
                "plan_tflops_per_gpu", "plan_peak_memory_gib"):
        assert isinstance(last[key], float) and last[key] > 0, key
    assert last["memory_kind"] == "cpu_peak_rss"
    assert last["mfu"] == pytest.approx(last["tflops_per_gpu"] / 1.0)  # cluster=local: a 1 TFLOP/s "GPU"
    plan = json.loads((run_dir / "plan.json").read_text())
    assert last["tflops_per_gpu"] == pytest.approx(last["tokens_per_s"] * plan["flops"]["per_token"] / 2 / 1e12)
    evals = _records(run_dir, "eval")
    assert [e["step"] for e in evals] == [7, STEPS] and evals[-1]["val_loss"] < first["loss"] - 1.0


def test_checkpoints_latest_and_retention(trained):
    ckpts = trained["run_dir"] / "checkpoints"
    assert (ckpts / "latest").read_text() == f"step_{STEPS:07d}"
    kept = sorted(p.name for p in ckpts.glob("step_*"))
    assert len(kept) == 3 and kept[-1] == f"step_{STEPS:07d}"
    assert not list(ckpts.glob(".tmp_*"))
    marker = json.loads((ckpts / kept[-1] / "trainctl.json").read_text())
    assert marker["step"] == STEPS and marker["consumed_samples"] == STEPS * 8


def test_final_hugging_face_model_loads(trained):
    from transformers import AutoModelForCausalLM

    final = trained["run_dir"] / "checkpoints/final"
    model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
    c = model.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size) == ("llama", 256, 4, 2, 688, 4096)
    assert (final / "tokenizer.json").is_file()
    assert 0.01 < model.model.embed_tokens.weight.std().item() < 0.1  # trained from the 0.02 init, not all zeros


def test_wandb_offline_run_is_one_run_across_the_resume(trained):
    run_dir = trained["run_dir"]
    run_id = (run_dir / "wandb_id").read_text().strip()
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # both jobs, one run id


def test_resume_with_a_changed_config_is_refused(trained):
    cwd, prepared, run_dir = trained["cwd"], trained["prepared"], trained["run_dir"]
    _render(cwd, prepared, "optim.lr=5e-4", "train.seed=7")
    out = subprocess.run([sys.executable, "-m", "launch.train", str(run_dir)], cwd=cwd, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "refusing to resume" in out.stderr and "optim.lr: 0.001 -> 0.0005" in out.stderr
    assert "train.seed: 1234 -> 7" in out.stderr
    # submit says so on the login node, before the job would wait in a queue, and writes nothing
    before = (run_dir / "config.yaml").read_text()
    out = run_trainctl("submit", "recipe=tiny_local", f"data.prepared_dir={prepared}", f"train.steps={STEPS}",
                       "train.checkpoint_interval=4", "train.eval_interval=7", "optim.lr=1e-4", cwd=cwd)
    assert out.returncode == 2 and "refusing to resume" in out.stderr and "optim.lr: 0.001 -> 0.0001" in out.stderr
    assert (run_dir / "config.yaml").read_text() == before


def test_batch_ramp_up_grows_the_batch_and_the_tags_reach_wandb(tmp_path, prepared):
    """train.rampup_batch_size=[4,4,16]: 4 steps of 4 sequences (16 samples), then the full 8; one point's
    overrides and wandb.tags become the wandb run's tags."""
    run_dir = _render(tmp_path, prepared, "train.rampup_batch_size=[4,4,16]", "wandb.tags=[ramp-test]")
    done = _torchrun(run_dir)
    out, _ = done.communicate(timeout=240)
    assert done.returncode == 0, out[-5000:]
    records = _records(run_dir)
    assert [r["global_batch_size"] for r in records] == [4] * 4 + [8] * (STEPS - 4)
    assert records[-1]["consumed_samples"] == 16 + 8 * (STEPS - 4)
    assert records[-1]["loss"] < records[0]["loss"]
    assert "batch ramp-up 4 + 4 over 16 samples" in out
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = log.read_bytes()
    for tag in (b"ramp-test", b"train.rampup_batch_size=[4,4,16]", b"stage=pretrain", b"backend=deepspeed"):
        assert tag in data, tag
