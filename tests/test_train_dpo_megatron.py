"""DPO on the Megatron-Core trainer, for real: megatron-core's model and schedules on CPU ranks over gloo
(torch.cuda redirected: launch.train.cuda_on_cpu), the shipped preference sample, the tiny model.

One run on a single process (tp = pp = 1) is the reference. At step 1 the policy is the reference
(both start from the same weights), so the loss is log 2 exactly. tp 2 and pp 2 must reproduce its
losses and grad norms step by step: the reference model is sharded like the policy, its
log-probabilities come from the vocab-parallel cross entropy (tp) and reach the loss on the last
pipeline stage (pp). Every run gets a NaN loss at step 2 (the guard skips it, on every layout alike),
and the pp 2 run is stopped by SIGUSR1 and resumed on the way (the reference is rebuilt, not saved).

The loss the trainer computes is also checked against the shared ``launch.train.dpo`` on
log-probabilities taken from the full logits of the same weights (the trained policy, the initial
reference), outside the schedule.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import records as _records
from tests.conftest import run_trainctl, stop_and_resume, torchrun, train, trainer_env

STEPS = 4
NAN_AT = 2
COMMON = ("recipe=tiny_dpo", "backend=megatron", "stage.lr=1e-3", f"train.steps={STEPS}", "optim.warmup_steps=1",
          f"train.eval_interval={STEPS}",
          "train.eval_iters=1", "train.checkpoint_interval=100", "model.seq_length=128",
          "model.max_position_embeddings=128", "model.num_layers=2", "model.hidden_size=128",
          "model.ffn_hidden_size=344", "train.global_batch_size=4", "parallel.micro_batch_size=1")
"""The tiny model made smaller (2 layers of 128); 4 pairs per step (8 sequences of 128 tokens), one pair
per micro-batch."""
LAYOUTS = {"tp2": ("parallel.tp=2", "train.save_final=false"), "pp2": ("parallel.pp=2", "train.save_final=false")}
LOSS_REL, GRAD_NORM_REL = 1e-5, 1e-4


def _env() -> dict:
    return trainer_env(TRAINCTL_FAULT_NAN_AT_STEP=str(NAN_AT))


def _render(cwd: Path, *extra: str) -> Path:
    out = run_trainctl("render", *COMMON, *extra, cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    return cwd / "runs/tiny_dpo"


def _norms(records: list[dict]) -> list[float]:
    return [float("nan") if r["grad_norm"] is None else r["grad_norm"] for r in records]  # None: a skipped step


def _margins(records: list[dict]) -> list[float]:
    return [r.get("rewards/margins", float("nan")) for r in records]  # none for a skipped step


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    done = {}
    ref = _render(tmp_path_factory.mktemp("ref"), "cluster.gpus_per_node=1")
    done["ref"] = (ref, train(ref, 1, _env()))
    for name, overrides in LAYOUTS.items():
        run_dir = _render(tmp_path_factory.mktemp(name), *overrides)
        done[name] = (run_dir, stop_and_resume(run_dir, 2, after=NAN_AT, env=_env()) if name == "pp2"
                          else train(run_dir, 2, _env()))
    return done


def test_the_first_step_is_log_2_then_the_margin_rises_and_the_loss_falls(runs):
    run_dir, out = runs["ref"]
    assert "DPO sigmoid, beta 0.1, against a frozen reference from the initial weights" in out, out[-3000:]
    records = _records(run_dir)
    # At step 1 the policy is the reference: every reward is 0, the loss log 2.
    assert records[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert records[0]["rewards/margins"] == pytest.approx(0, abs=1e-9)
    margins = _margins(records)
    assert margins[-1] > margins[0] + 0.1 and records[-1]["rewards/accuracies"] > 0.5, margins
    assert records[-1]["loss"] < math.log(2) - 0.1, [r["loss"] for r in records]
    val = _records(run_dir, "eval")[-1]
    assert val["val_loss"] < math.log(2) and val["val_rewards/margins"] > 0, val


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_reproduces_the_single_process_run(runs, layout):
    ref, got = _records(runs["ref"][0]), _records(runs[layout][0])
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=LOSS_REL, nan_ok=True)
    assert _norms(got) == pytest.approx(_norms(ref), rel=GRAD_NORM_REL, nan_ok=True)
    assert _margins(got) == pytest.approx(_margins(ref), rel=GRAD_NORM_REL, abs=1e-6, nan_ok=True)
    assert [e["val_loss"] for e in _records(runs[layout][0], "eval")] == pytest.approx(
        [e["val_loss"] for e in _records(runs["ref"][0], "eval")], rel=LOSS_REL)


def test_the_nan_step_is_skipped_on_every_layout(runs):
    for name, (run_dir, _) in runs.items():
        record = _records(run_dir)[NAN_AT - 1]
        assert record["skipped_steps"] == 1 and not math.isfinite(record["loss"]), (name, record)


def test_sigusr1_saves_stops_and_resumes_with_the_reference_rebuilt(runs):
    run_dir, out = runs["pp2"]
    assert "stopped by SIGUSR1 at step" in out, out[-3000:]
    stopped_at = int(out.split("stopped by SIGUSR1 at step ")[1].split(",")[0])
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:07d}'}: step {stopped_at}" in out
    assert out.count("against a frozen reference from the initial weights") == 2


CHECK = '''
import sys
from pathlib import Path

import torch

from launch.record.read import read_config, read_plan
from launch.train.data import build_datasets, micro_batch
from launch.train.dpo import dpo_loss, sequence_logps, split_pairs
from launch.train.init_source import Format, InitSource
from launch.train.megatron.dpo import DpoObjective
from launch.train.megatron.module import MegatronModule


def main():  # under a main guard: megatron-core's checkpoint writer starts a spawned process
    run = Path(sys.argv[1])
    record = read_config(run)
    m = MegatronModule(run, record, read_plan(run))
    final = run / "checkpoints/final"  # a Hugging Face model, the distributed checkpoint beside it in megatron/
    m.init_from(InitSource(final / "megatron", Format.megatron))  # the trained policy; the reference: initial weights
    data = build_datasets(record.cfg, train_samples=8, valid_samples=0, cache_dir=run / "check_cache")
    batches = [tuple(micro_batch(data.train, first_sample=4, micro=i, micro_batch_size=1, dp_rank=0, dp=1))
               for i in range(4)]
    with m.evaluating():
        policy, reference = m.built.chunks[0].module, m.dpo.reference[0]
        logps = []  # (policy sums, reference sums, token counts) per micro-batch, from the full logits
        for batch in batches:
            tokens, labels, mask = split_pairs(*batch)
            positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
            p, counts = sequence_logps(policy(tokens, positions, None), labels, mask)
            r, _ = sequence_logps(reference(tokens, positions, None), labels, mask)
            logps.append((p.chunk(2), r.chunk(2), counts.chunk(2)))
        for loss_type in ("sigmoid", "ipo", "hinge"):
            m.dpo.loss_type = loss_type
            trainer_loss = m.mean_loss([m.eval_step(batches)])
            by_hand = [float(dpo_loss(pc, pr, rc, rr, beta=record.cfg.stage.dpo_beta, loss_type=loss_type,
                                      chosen_tokens=nc, rejected_tokens=nr)[0])
                       for (pc, pr), (rc, rr), (nc, nr) in logps]
            print("LOSSES", loss_type, trainer_loss, sum(by_hand) / len(by_hand))
        # The policy's log-probs again, by transformers from the Hugging Face export of the same weights.
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
        m.dpo.loss_type = "sigmoid"
        by_transformers = []
        for batch, (_, (rc, rr), _) in zip(batches, logps):
            tokens, labels, mask = split_pairs(*batch)
            pc, pr = sequence_logps(hf_model(tokens).logits, labels, mask)[0].chunk(2)
            by_transformers.append(float(dpo_loss(pc, pr, rc, rr, beta=record.cfg.stage.dpo_beta, loss_type="sigmoid")[0]))
        print("TRANSFORMERS", m.mean_loss([m.eval_step(batches)]), sum(by_transformers) / len(by_transformers))
        # A reference loaded from the policy's own checkpoint, either format, is the policy again.
        for source in (InitSource(final / "megatron", Format.megatron), InitSource(final, Format.hf)):
            m.dpo = DpoObjective(doc=m.doc, stage=record.cfg.stage, device=m.device, mbs=m.mbs, seq=m.seq,
                                 source=source, hf_config=m._hf_config)
            print("SAME", source.format.name, m.mean_loss([m.eval_step(batches)]),
                  m.window_metrics([m.eval_step(batches)])["rewards/margins"])
    m.close()


if __name__ == "__main__":
    main()
'''


def test_the_loss_is_the_shared_dpo_loss_on_full_logits(runs, tmp_path):
    """The trained policy against its initial weights on 4 pairs: the schedule's loss (vocab-parallel cross
    entropy, reference log-probs handed to the last stage) equals launch.train.dpo on the full logits, for
    each loss type (IPO's per-token average needs the token counts through the same path), and on the
    policy's log-probs computed by transformers from its Hugging Face export (``final/``). A reference
    loaded from the policy's own final checkpoint (its distributed checkpoint, or its Hugging Face export
    imported) gives log 2 and no margin."""
    run_dir = runs["ref"][0]
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    proc = torchrun(run_dir, 1, _env(), command=(str(script), str(run_dir)))
    out, _ = proc.communicate(timeout=200)
    assert proc.returncode == 0, out[-8000:]
    found = {line.split()[1]: tuple(map(float, line.split()[2:4])) for line in out.splitlines()
             if line.startswith("LOSSES ")}
    assert sorted(found) == ["hinge", "ipo", "sigmoid"], out[-3000:]
    for loss_type, (trainer_loss, by_hand) in found.items():
        assert trainer_loss == pytest.approx(by_hand, rel=1e-5), loss_type
    trainer_loss = found["sigmoid"][0]
    assert abs(trainer_loss - math.log(2)) > 0.05  # the policy moved: a real comparison, not log 2 twice
    trainer_loss, by_transformers = map(float, out.split("TRANSFORMERS ")[1].split()[:2])
    assert trainer_loss == pytest.approx(by_transformers, rel=1e-4)
    same = {line.split()[1]: tuple(map(float, line.split()[2:4])) for line in out.splitlines()
            if line.startswith("SAME ")}
    assert sorted(same) == ["hf", "megatron"], out[-3000:]
    for loss, margin in same.values():
        assert loss == pytest.approx(math.log(2), rel=1e-5) and margin == pytest.approx(0, abs=1e-5)
