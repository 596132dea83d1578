"""Bad numbers in training (launch/train/guard.py), for real: both trainers under torchrun, 2 CPU ranks.

The faults are the test-only knobs ``TRAINCTL_FAULT_NAN_AT_STEP`` (the loss of a step becomes NaN
on rank 0 only: the all-reduce must carry it to the other rank) and ``TRAINCTL_FAULT_SPIKE_AT_STEP``
(the loss value of a step times 1000, its gradient unchanged). Three runs per backend at most, each a
few steps of the tiny model:

- NaN at step 2 and a spike at step 5 (checkpoints every 3 steps): step 2 is skipped without an update
  (the validation loss after it equals the one before, to the last bit), the spike rewinds to step 3
  and the data moves past it, and the run ends ``done``;
- DeepSpeed, ``optim.lr=1e6`` (a real divergence) with ``max_consecutive_skips=2``: ``diverged``, exit
  code 6, nothing saved after it, every tensor saved before it finite;
- Megatron-Core: spikes at steps 3 and 4 with ``max_rewinds=1``: ``diverged`` at the second; the job
  run again (as a requeue would) resumes from the checkpoint before the first spike and still skips
  its data window (recorded in RUN_DIR/guard.json, no checkpoint after the rewind), and its step 3
  equals the first job's step 3 after the rewind exactly.

A skip and a rewind change the weights and the data by design, so no loss after one equals an
undisturbed run's; what must be equal is: the validation loss across a skipped step, and a step
replayed from the same checkpoint and data position.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from launch.record import outcome
from launch.record.outcome import Outcome
from launch.train import guard
from tests.conftest import PYTHONPATH, SMALL_MODEL, run_trainctl

GBS = 8  # tiny_local's global batch
POLICY = ("train.guard.spike_window=2", "train.guard.spike_zscore=10", "train.guard.spike_skip_batches=2")


def _render(cwd: Path, data: Path, backend: str, steps: int, *extra: str) -> Path:
    out = run_trainctl("render", "recipe=tiny_local", f"backend={backend}", f"data.prepared_dir={data}", *SMALL_MODEL,
                       f"train.steps={steps}", "train.log_interval=1", "train.eval_iters=1",
                       "train.eval_interval=100", *POLICY, *extra, cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    return cwd / "runs/tiny_local"


def _torchrun(run_dir: Path, **faults: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **faults}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "launch.train",
         str(run_dir)], cwd=run_dir.parent.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=400)


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _outcomes(run_dir: Path) -> list[outcome.Record]:
    return sorted((outcome.read(p) for p in (run_dir / "outcomes").glob("*.json")), key=lambda r: r.time)


# --- the pure decisions ------------------------------------------------------------------------

P = SimpleNamespace(max_consecutive_skips=3, max_skipped_steps=4, spike_zscore=6.0, spike_window=3,
                    spike_skip_batches=2, max_rewinds=1)


def _decide(counters=None, consecutive=0, history=(3.0, 2.9, 2.8), loss=2.7, grad_norm=1.0, engine_skipped=False,
            have_checkpoint=True) -> guard.Verdict:
    return guard.decide(P, counters or guard.Counters(), consecutive, list(history), step=7, loss=loss,
                        grad_norm=grad_norm, engine_skipped=engine_skipped, have_checkpoint=have_checkpoint)


def test_a_non_finite_step_is_skipped_until_the_bounds_say_diverged():
    assert _decide().action == "ok"
    for bad in ({"loss": math.nan}, {"loss": math.inf}, {"grad_norm": math.nan}, {"engine_skipped": True}):
        v = _decide(**bad)
        assert v.action == "skip" and "step 7" in v.cause, bad
    v = _decide(loss=math.nan, consecutive=2)
    assert v.action == "diverged" and "3 non-finite step(s) in a row" in v.cause and "max_consecutive_skips=3" in v.cause
    v = _decide(loss=math.nan, counters=guard.Counters(skipped_steps=3))
    assert v.action == "diverged" and "max_skipped_steps=4" in v.cause


def test_a_spike_is_judged_against_a_full_window_and_rewinds_are_bounded():
    assert _decide(history=(3.0, 2.9), loss=50.0).action == "ok"  # fewer losses than the window: no judgement
    v = _decide(loss=3.5)
    assert v.action == "rewind" and v.zscore > 6 and "loss spike at step 7" in v.cause
    assert _decide(loss=2.95).action == "ok"  # within the window's spread
    assert _decide(history=(3.0, 3.0, 3.0), loss=3.1).action == "ok"  # a flat window: its std is floored (1%)
    assert _decide(history=(3.0, 3.0, 3.0), loss=3.2).action == "rewind"
    v = _decide(loss=3.5, counters=guard.Counters(rewinds=1))
    assert v.action == "diverged" and "max_rewinds=1" in v.cause
    v = _decide(loss=3.5, have_checkpoint=False)
    assert v.action == "diverged" and "no checkpoint" in v.cause


def test_a_resume_at_the_rewound_checkpoint_continues_past_the_newest_skipped_window():
    c = guard.Counters(skips=[{"step": 3, "from_sample": 24, "to_sample": 56},
                              {"step": 3, "from_sample": 24, "to_sample": 80}])
    assert guard.resume_position(c, 3, 24) == 80  # a second rewind to the same checkpoint went further
    assert guard.resume_position(c, 6, 80) == 80  # a later checkpoint already holds the skipped position
    assert guard.resume_position(c, 3, 32) == 32


def test_fault_knobs_fire_once_per_listed_step():
    f = guard.Faults({"TRAINCTL_FAULT_NAN_AT_STEP": "2,5-6", "TRAINCTL_FAULT_SPIKE_AT_STEP": "3"})
    assert [f.kind(s) for s in range(1, 8)] == [None, "nan", "spike", None, "nan", "nan", None]
    assert f.kind(3) is None  # replayed after a rewind: clean
    assert guard.Faults({}).kind(1) is None


def test_absurd_guard_values_are_refused(tmp_path):
    out = run_trainctl("plan", "recipe=tiny_local", "train.guard.max_consecutive_skips=0",
                       "train.guard.spike_zscore=0.5", "train.guard.spike_window=1", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    for key, value in (("max_consecutive_skips", "0"), ("spike_zscore", "0.5"), ("spike_window", "1")):
        assert re.search(rf"train\.guard\.{key}.*{re.escape(value)}", out.stderr), out.stderr
    assert "fix:" in out.stderr


def test_a_diverged_job_step_stops_without_a_requeue(workdir: Path):
    """The stub srun of tests/test_sbatch.py, taught one more mode: the trainer's diverged record."""
    from tests import test_sbatch

    bin_dir = workdir / "stub-bin"
    bin_dir.mkdir()
    srun = test_sbatch.STUB_SRUN.replace("  silent) exit 1 ;;", "  silent) exit 1 ;;\n  diverged) outcome diverged "
                                         "'step 9: loss nan: 5 non-finite step(s) in a row'; exit 1 ;;")
    assert srun != test_sbatch.STUB_SRUN
    for name, text in (("srun", srun), ("scontrol", test_sbatch.STUB_SCONTROL), ("sinfo", test_sbatch.STUB_SINFO)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = test_sbatch.render(workdir, "recipe=tiny_slurm")
    result = test_sbatch.run_script(script, bin_dir, "diverged", cwd=workdir)
    assert result.returncode == 1
    assert "requeue" not in (bin_dir / "scontrol.calls").read_text()
    log = (script.parent / "job.log").read_text()
    assert re.search(r"training diverged on \S+: step 9: loss nan: 5 non-finite step\(s\) in a row \(a requeue "
                     r"would replay the same data.*; not requeued", log), log


# --- real runs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["deepspeed", "megatron"])
def nan_and_spike(request, tmp_path_factory, prepared) -> dict:  # noqa: F811
    """NaN at step 2 (rank 0), a spike at step 5; checkpoints every 3 steps; validation every step."""
    cwd = tmp_path_factory.mktemp(f"faults_{request.param}")
    run_dir = _render(cwd, prepared, request.param, 6, "train.checkpoint_interval=3", "train.eval_interval=1")
    done = _torchrun(run_dir, TRAINCTL_FAULT_NAN_AT_STEP="2", TRAINCTL_FAULT_SPIKE_AT_STEP="5")
    return {"run_dir": run_dir, "out": done.stdout, "rc": done.returncode, "backend": request.param}


def test_a_nan_step_is_skipped_without_an_update_and_training_goes_on(nan_and_spike):
    run_dir, out = nan_and_spike["run_dir"], nan_and_spike["out"]
    assert nan_and_spike["rc"] == 0, out[-6000:]
    assert [r.outcome for r in _outcomes(run_dir)] == [Outcome.done]
    [skip] = _records(run_dir, "skip")
    assert skip["step"] == 2 and skip["skipped_steps"] == 1 and "loss nan" in skip["cause"]
    assert out.count("step 2: loss nan") == 1  # one line, from rank 0
    evals = {r["step"]: r["val_loss"] for r in _records(run_dir, "eval")}
    assert evals[2] == evals[1], evals  # the same weights to the last bit: no optimizer update at step 2
    assert evals[3] < evals[2]  # and training went on
    train = _records(run_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert math.isnan(train[1]["loss"]) and all(math.isfinite(r["loss"]) for r in train[2:])
    assert (run_dir / "checkpoints/final").is_dir()


def test_a_spike_rewinds_to_the_checkpoint_before_it_and_skips_its_data(nan_and_spike):
    run_dir = nan_and_spike["run_dir"]
    assert nan_and_spike["rc"] == 0
    [rewind] = _records(run_dir, "rewind")
    # the checkpoint of step 3 read samples 0..23; steps 4-5 read 24..39; 2 more batches skipped: 40..55
    assert (rewind["step"], rewind["to_step"], rewind["from_sample"], rewind["to_sample"]) == (5, 3, 24, 56)
    assert rewind["rewinds"] == 1 and rewind["skipped_samples"] == 32
    assert rewind["loss"] > 1000 and rewind["zscore"] > 10  # the spike's own step is not a train record
    assert [r["step"] for r in _records(run_dir, "discarded_train")] == [4]
    train = {r["step"]: r for r in _records(run_dir, "train")}
    assert train[4]["consumed_samples"] == 56 + GBS and train[6]["consumed_samples"] == 56 + 3 * GBS
    assert (train[6]["skipped_steps"], train[6]["rewinds"], train[6]["skipped_samples"]) == (1, 1, 32)
    assert json.loads((run_dir / "guard.json").read_text())["skips"] == [
        {"step": 3, "from_sample": 24, "to_sample": 56}]
    assert "rewinding to the checkpoint of step 3 and skipping samples 24..55" in nan_and_spike["out"]


def _tensors(obj):
    if hasattr(obj, "dtype") and hasattr(obj, "is_floating_point"):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_a_real_divergence_ends_diverged_with_nothing_non_finite_saved(tmp_path_factory, prepared):  # noqa: F811
    """The issue's reproduction, optim.lr=1e6 on DeepSpeed: it once trained to "done" and saved NaN. Now its
    gradient norms overflow (DeepSpeed discards those steps) until two in a row end the run. `plan` refuses
    that lr now (launch.config.schema.BOUNDS), but the trainer must still stop a run that diverges for real,
    so the rendered record is given it afterwards, as a hand edit or an older trainctl's record could."""
    import torch

    cwd = tmp_path_factory.mktemp("diverged_ds")
    run_dir = _render(cwd, prepared, "deepspeed", 8, "train.checkpoint_interval=2",
                      "train.guard.max_consecutive_skips=2")
    _set_lr(run_dir, 1e6)
    run = _torchrun(run_dir)
    assert run.returncode != 0
    assert re.search(r"exitcode\s*:\s*6\b", run.stdout), run.stdout[-4000:]  # each rank's code, as torchrun says
    [record] = _outcomes(run_dir)
    assert record.outcome == Outcome.diverged and "2 non-finite step(s) in a row" in record.cause, record
    assert run.stdout.count(f"trainctl: training diverged: step {record.step}: grad norm inf") == 1
    assert not re.search(r'File ".*/launch/', run.stdout)  # no traceback of a rank (torchrun prints its own)
    skips = _records(run_dir, "skip")
    assert skips and all(r["step"] < record.step for r in skips)
    assert _records(run_dir, "diverged")[0]["skipped_steps"] == len(skips)
    ckpts = run_dir / "checkpoints"
    saved = sorted(int(p.name.removeprefix("step_")) for p in ckpts.glob("step_*"))
    assert saved and max(saved) < record.step and not (ckpts / "final").exists()
    files = list(ckpts.glob("step_*/*.pt"))
    assert files and all(torch.isfinite(t).all() for f in files
                         for t in _tensors(torch.load(f, weights_only=False, map_location="cpu"))
                         if t.is_floating_point())


def _set_lr(run_dir: Path, lr: float) -> None:
    """The learning rate in the rendered record: config.yaml and DeepSpeed's ds_config.json."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["optim"]["lr"] = lr
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    ds = json.loads((run_dir / "ds_config.json").read_text())
    ds["optimizer"]["params"]["lr"] = lr
    (run_dir / "ds_config.json").write_text(json.dumps(ds, indent=2))


@pytest.mark.parametrize("backend", ["deepspeed", "megatron"])
def test_a_non_finite_weight_is_never_saved(tmp_path_factory, prepared, backend):  # noqa: F811
    """A weight turned NaN after step 2's update on rank 0 only (the loss and gradients were fine): the
    save of step 2 refuses, on every rank, and the run ends diverged with no checkpoint and no export."""
    cwd = tmp_path_factory.mktemp(f"nan_weight_{backend}")
    run_dir = _render(cwd, prepared, backend, 4, "train.checkpoint_interval=2", "optim.warmup_steps=2")
    run = _torchrun(run_dir, TRAINCTL_FAULT_NAN_WEIGHT_AT_STEP="2")
    [record] = _outcomes(run_dir)
    assert record.outcome == Outcome.diverged and record.step == 2, run.stdout[-4000:]
    assert record.cause == "step 2: a parameter is not finite; no checkpoint written"
    assert not list((run_dir / "checkpoints").glob("step_*")) and not (run_dir / "checkpoints/final").exists()


def test_rewinds_are_bounded_and_a_requeue_keeps_the_skipped_window(tmp_path_factory, prepared):  # noqa: F811
    cwd = tmp_path_factory.mktemp("rewinds_megatron")
    run_dir = _render(cwd, prepared, "megatron", 5, "train.checkpoint_interval=2", "train.guard.max_rewinds=1",
                      "optim.warmup_steps=2")
    first = _torchrun(run_dir, TRAINCTL_FAULT_SPIKE_AT_STEP="3,4")
    assert first.returncode != 0
    [record] = _outcomes(run_dir)
    assert record.outcome == Outcome.diverged and record.step == 4 and "max_rewinds=1" in record.cause
    [rewind] = _records(run_dir, "rewind")
    assert (rewind["step"], rewind["to_step"], rewind["from_sample"], rewind["to_sample"]) == (3, 2, 16, 40)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_0000002"]
    # Run again, as a requeue would (no fault this time): from step 2's checkpoint, past the skipped window.
    second = _torchrun(run_dir)
    assert second.returncode == 0, second.stdout[-6000:]
    assert "skipping samples 16..39 after step 2" in second.stdout
    train = {r["step"]: r for r in _records(run_dir, "train")}
    assert train[3]["consumed_samples"] == 40 + GBS and train[5]["consumed_samples"] == 40 + 3 * GBS
    # The first job's step 3 after its rewind (same checkpoint, same data position) to the last bit.
    [replayed] = _records(run_dir, "discarded_train")
    assert replayed["step"] == 3 and replayed["loss"] == train[3]["loss"]
    assert _outcomes(run_dir)[-1].outcome == Outcome.done
