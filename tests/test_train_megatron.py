"""The Megatron-Core trainer, for real: megatron-core's model, DDP, optimizer, schedules and
distributed checkpoints on 2 CPU ranks over gloo (torch.cuda redirected: launch.train.cuda_on_cpu).

One run of the tiny_local recipe on a single process (tp = pp = dp = 1) is the reference.
Each layout (tp 2, pp 2, pp 2 x vpp 2) must reproduce its losses and grad norms step by step
within floating-point tolerance: megatron-core's misconfigurations (batched p2p under
interleaving, weights not tagged tensor-parallel, missing grad reductions) change them without
an error, so equality is the test. The pp 2 run is stopped by SIGUSR1 and resumed on the way.
The tp 2 run checkpoints at step 3; that checkpoint resumes at tp 1 x dp 2 (model and
distributed-optimizer state resharded) and must continue with the reference's losses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import records as _records
from tests.conftest import run_trainctl, stop_and_resume, train, trainer_env

STEPS = 6
SAVE_AT = 3
LAYOUTS = {"tp2": ("parallel.tp=2",), "pp2": ("parallel.pp=2",), "pp2_vpp2": ("parallel.pp=2", "parallel.vpp=2")}
LOSS_REL, GRAD_NORM_REL = 1e-5, 1e-4
"""Seen: losses agree to ~3e-8 relative, grad norms to ~6e-6 (tensor-parallel sums in another order)."""


def _render(cwd: Path, prepared: Path, *extra: str) -> Path:
    out = run_trainctl("render", "recipe=tiny_local", "backend=megatron", f"data.prepared_dir={prepared}",
                       f"train.steps={STEPS}", "train.eval_interval=3", "train.eval_iters=1",
                       "train.checkpoint_interval=100", *extra, cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    return cwd / "runs/tiny_local"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared) -> dict:
    """{name: (run_dir, output)}: the reference, each layout, and the tp 2 checkpoint resumed at tp 1 x dp 2."""
    done = {}
    ref = _render(tmp_path_factory.mktemp("ref"), prepared, "cluster.gpus_per_node=1")
    done["ref"] = (ref, train(ref, 1))
    for name, overrides in LAYOUTS.items():
        extra = (f"train.checkpoint_interval={SAVE_AT}",) if name == "tp2" else ()
        run_dir = _render(tmp_path_factory.mktemp(name), prepared, *overrides, *extra)
        # pp 2 is stopped by SIGUSR1 on the way and resumed (same layout): its records must not notice.
        done[name] = (run_dir, stop_and_resume(run_dir, 2, after=2) if name == "pp2" else train(run_dir, 2))
    # The tp 2 run's step-3 checkpoint, alone in a new run directory rendered at tp 1 (dp 2).
    cwd = tmp_path_factory.mktemp("resharded")
    run_dir = _render(cwd, prepared)
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir()
    step = f"step_{SAVE_AT:07d}"
    subprocess.run(["cp", "-r", str(done["tp2"][0] / "checkpoints" / step), str(ckpts / step)], check=True)
    (ckpts / "latest").write_text(step)
    done["resharded"] = (run_dir, train(run_dir, 2))
    return done


def test_cuda_on_cpu_redirects_devices_in_its_own_process():
    code = (
        "import torch\n"
        "from launch.train import cuda_on_cpu\n"
        "cuda_on_cpu.install()\n"
        "t = torch.zeros(3, device='cuda')\n"
        "u = torch.empty(2, device=torch.cuda.current_device(), pin_memory=True).cuda().to('cuda:0')\n"
        "assert t.device.type == u.device.type == 'cpu' and t.type() == 'torch.cuda.FloatTensor'\n"
        "torch.cuda.synchronize(); torch.cuda.manual_seed(3); a = torch.rand(2)\n"
        "torch.manual_seed(3); assert torch.equal(a, torch.rand(2))\n"
        "assert not torch.cuda.is_available()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=trainer_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_reproduces_the_single_process_run(runs, layout):
    ref, got = _records(runs["ref"][0]), _records(runs[layout][0])
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=LOSS_REL)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in ref], rel=GRAD_NORM_REL)
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in ref])
    evals, ref_evals = _records(runs[layout][0], "eval"), _records(runs["ref"][0], "eval")
    assert [e["step"] for e in evals] == [3, STEPS]
    assert [e["val_loss"] for e in evals] == pytest.approx([e["val_loss"] for e in ref_evals], rel=LOSS_REL)


@pytest.mark.parametrize("name", ["ref", *sorted(LAYOUTS), "resharded"])
def test_loss_falls(runs, name):
    records = _records(runs[name][0])
    assert records[-1]["loss"] < records[0]["loss"] - 0.3, [r["loss"] for r in records]


def test_the_layout_is_the_one_asked_for(runs):
    expected = {"ref": "1 rank(s) = tp 1 x pp 1 (vpp 1) x cp 1 x dp 1", "tp2": "2 rank(s) = tp 2 x pp 1 (vpp 1)",
                "pp2": "2 rank(s) = tp 1 x pp 2 (vpp 1)", "pp2_vpp2": "2 rank(s) = tp 1 x pp 2 (vpp 2)",
                "resharded": "2 rank(s) = tp 1 x pp 1 (vpp 1) x cp 1 x dp 2"}
    for name, text in expected.items():
        assert text in runs[name][1], name


def test_sigusr1_saves_a_checkpoint_stops_and_resumes(runs):
    run_dir, out = runs["pp2"]
    assert "stopped by SIGUSR1 at step" in out and "checkpoint saved" in out, out[-3000:]
    stopped_at = int(out.split("stopped by SIGUSR1 at step ")[1].split(",")[0])
    assert 2 <= stopped_at < STEPS
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:07d}'}: step {stopped_at}" in out


def test_distributed_checkpoint_is_committed(runs):
    ckpts = runs["tp2"][0] / "checkpoints"
    assert (ckpts / "latest").read_text() == f"step_{STEPS:07d}"
    assert sorted(p.name for p in ckpts.glob("step_*")) == [f"step_{SAVE_AT:07d}", f"step_{STEPS:07d}"]
    assert not list(ckpts.glob(".tmp_*"))
    step = ckpts / f"step_{SAVE_AT:07d}"
    from megatron.core import dist_checkpointing

    assert json.loads((step / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    content = dist_checkpointing.load_content_metadata(str(step))
    assert content["distrib_optim_sharding_type"] == "fully_reshardable"
    marker = json.loads((step / "trainctl.json").read_text())
    assert marker["step"] == SAVE_AT and marker["consumed_samples"] == SAVE_AT * 8
    assert marker["layout"] == {"tp": 2, "pp": 1, "vpp": 1, "dp": 1}


def test_a_tp2_checkpoint_resumes_at_tp1_with_the_same_losses(runs):
    run_dir, out = runs["resharded"]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{SAVE_AT:07d}'}: step {SAVE_AT}" in out, out[-3000:]
    got, ref = _records(run_dir), _records(runs["ref"][0])[SAVE_AT:]
    assert [r["step"] for r in got] == list(range(SAVE_AT + 1, STEPS + 1))
    # Adam's moments and step came through: a fresh optimizer state would move step 4 elsewhere.
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=LOSS_REL)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in ref], rel=GRAD_NORM_REL)
    assert got[-1]["consumed_samples"] == STEPS * 8


def test_resume_allows_another_layout_but_not_another_config(runs, prepared):
    run_dir = runs["tp2"][0]
    _render(run_dir.parent.parent, prepared, "parallel.pp=2", "optim.lr=5e-4")
    out = subprocess.run([sys.executable, "-m", "launch.train", str(run_dir)], cwd=run_dir.parent.parent, env=trainer_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "refusing to resume" in out.stderr and "optim.lr: 0.001 -> 0.0005" in out.stderr
    assert "parallel.pp" not in out.stderr and "parallel.tp" not in out.stderr


def test_batch_ramp_up_through_the_interleaved_schedule(tmp_path, prepared):
    """train.rampup_batch_size=[4,4,8] at pp 2 x vpp 2: 2 micro-batches per step, then the full 4."""
    run_dir = _render(tmp_path, prepared, "parallel.pp=2", "parallel.vpp=2", "train.rampup_batch_size=[4,4,8]")
    train(run_dir, 2)
    records = _records(run_dir)
    assert [r["global_batch_size"] for r in records] == [4, 4] + [8] * (STEPS - 2)
    assert records[-1]["consumed_samples"] == 8 + 8 * (STEPS - 2)
    assert records[-1]["loss"] < records[0]["loss"]
    assert (run_dir / "checkpoints/final/config.json").is_file()  # the next stage's stage.init_checkpoint
    assert (run_dir / "checkpoints/final/megatron/metadata.json").is_file()


@pytest.fixture(scope="module")
def checkpoint_logits(runs, tmp_path_factory) -> dict:
    """{layout: (tokens, Megatron's logits)}: each run's final/megatron/ loaded at tp 1 (tests/megatron_logits.py)."""
    import torch

    work = tmp_path_factory.mktemp("logits")
    tokens = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, work / "tokens.pt")
    jobs = [f"{runs[name][0]},{work / name}.pt" for name in ("tp2", "pp2")]
    out = subprocess.run([sys.executable, "-m", "tests.megatron_logits", str(runs["ref"][0]), str(work / "tokens.pt"),
                          *jobs], env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    return {name: (tokens, torch.load(work / f"{name}.pt")) for name in ("tp2", "pp2")}


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_final_is_a_hugging_face_model_with_the_checkpoints_logits(runs, checkpoint_logits, layout):
    """The end-of-run export of a tp 2 (pp 2) run: transformers loads final/ and computes the logits Megatron
    computes from final/megatron/ (resharded to tp 1), within 1e-5 (fp32; seen ~1e-6)."""
    import torch
    from transformers import AutoModelForCausalLM

    final = runs[layout][0] / "checkpoints/final"
    tokens, megatron = checkpoint_logits[layout]
    assert megatron["source"] == str(final / "megatron") and megatron["format"] == "megatron"
    model = AutoModelForCausalLM.from_pretrained(str(final), local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens).logits
    assert (logits - megatron["logits"]).abs().max().item() <= 1e-5


def test_the_export_command_writes_what_the_trainer_exported(runs, tmp_path):
    """``python -m launch.train.megatron.export RUN_DIR OUT``, one process, from the tp 2 run's checkpoint."""
    import torch
    from safetensors import safe_open

    run_dir, out = runs["tp2"][0], tmp_path / "hf"
    done = subprocess.run([sys.executable, "-m", "launch.train.megatron.export", str(run_dir), str(out)], env=trainer_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"exported {run_dir / 'checkpoints/final/megatron'} to {out} (Hugging Face model)"
    final = run_dir / "checkpoints/final"
    assert json.loads((out / "config.json").read_text()) == json.loads((final / "config.json").read_text())
    ours, theirs = (json.loads((d / "model.safetensors.index.json").read_text())["weight_map"] for d in (out, final))
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        with safe_open(str(out / ours[name]), "pt") as a, safe_open(str(final / theirs[name]), "pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
