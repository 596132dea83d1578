"""DPO (launch/train/dpo.py, preference.py, deepspeed_dpo.py): the loss equals TRL's on the same batch, the
preference samples weigh the completion only, bad pairs are refused at submit, and a real 2-process run of
recipe=tiny_dpo learns (the loss falls below log 2, the reward margin rises), stops on SIGUSR1 and resumes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PYTHONPATH, ROOT, run_trainctl

TOKENIZER = str(ROOT / "data/sample/tokenizer.json")
PAIRS = ROOT / "data/sample/preference.jsonl"
EOS = "<|endoftext|>"


# --- the loss ---------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_the_loss_equals_trls_on_the_same_batch(tmp_path, loss_type):
    """TRL 1.16's DPOTrainer computes its loss and rewards on a batch it tokenized itself; ours, from the
    same model's logits on the same ids, gives the same numbers (float32 tolerance)."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    from launch.train.dpo import dpo_loss, sequence_logps

    tok = PreTrainedTokenizerFast(tokenizer_file=TOKENIZER, eos_token=EOS, pad_token=EOS)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    policy, reference = LlamaForCausalLM(config), LlamaForCausalLM(config)
    rows = [{"prompt": "What does textwrap.fill do?", "chosen": " It wraps a paragraph.", "rejected": " No idea."},
            {"prompt": "Name a module.", "chosen": " json", "rejected": " I cannot tell from this, sorry."},
            {"prompt": "2 + 2?", "chosen": " 4", "rejected": " 5"}]
    beta = 0.3
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to=[], use_cpu=True,
                     beta=beta, loss_type=[loss_type], max_length=64)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, batch, False).item()
        logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}

        ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        labels, mask = ids[:, 1:], completion[:, 1:]
        logps, counts = sequence_logps(trainer.model(input_ids=ids, attention_mask=attention).logits[:, :-1],
                                       labels, mask)
        ref_logps, _ = sequence_logps(trainer.ref_model(input_ids=ids, attention_mask=attention).logits[:, :-1],
                                      labels, mask)
        n = len(rows)
        ours, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta=beta,
                                          loss_type=loss_type, chosen_tokens=counts[:n], rejected_tokens=counts[n:])
    assert ours.item() == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    assert chosen.mean().item() == pytest.approx(logged["rewards/chosen"], rel=1e-4, abs=1e-6)
    assert rejected.mean().item() == pytest.approx(logged["rewards/rejected"], rel=1e-4, abs=1e-6)
    assert (chosen > rejected).float().mean().item() == logged["rewards/accuracies"]
    assert abs(theirs - {"sigmoid": math.log(2), "hinge": 1.0, "ipo": 1 / (2 * beta) ** 2}[loss_type]) < 0.5


# --- the data ---------------------------------------------------------------------------------

def _weighted_text(enc, sample, row: int) -> str:
    return enc.chat.tokenizer.decode(sample["labels"][row][sample["loss_mask"][row].bool()])


def test_pairs_weigh_the_completion_only():
    """Every shipped pair: row 0 weighs exactly the chosen reply, row 1 the rejected one (not the earlier
    assistant turns of a multi-turn prompt); a prompt taken from the shared turns (ultrafeedback's shape) too."""
    from launch.train.preference import PreferenceEncoder

    enc = PreferenceEncoder(TOKENIZER, seq_length=256)
    for line in PAIRS.read_text().splitlines():
        record = json.loads(line)
        sample = enc(record)
        assert {k: tuple(v.shape) for k, v in sample.items()} == {k: (2, 256) for k in
                                                                  ("tokens", "labels", "loss_mask", "position_ids")}
        replies = [r if isinstance(r, str) else r[-1]["content"] for r in (record["chosen"], record["rejected"])]
        assert [_weighted_text(enc, sample, row) for row in (0, 1)] == [r + EOS for r in replies]
    sky = [{"role": "user", "content": "What color is the sky?"}]
    implicit = {"prompt": "What color is the sky?", "chosen": sky + [{"role": "assistant", "content": "Blue."}],
                "rejected": sky + [{"role": "assistant", "content": "Green."}]}
    sample = enc(implicit)
    assert [_weighted_text(enc, sample, row) for row in (0, 1)] == ["Blue." + EOS, "Green." + EOS]


def test_bad_pairs_are_refused_at_submit(tmp_path):
    """A file whose lines are not pairs: submit stops on the login node, exit 2, one line naming the key and line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "hello"}) + "\n")
    out = run_trainctl("submit", "recipe=tiny_dpo", f"data.sources.pairs.path={bad}", cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"data.sources.pairs.path={bad}: line 1: no 'rejected'" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs/tiny_dpo/metrics.jsonl").exists()


# --- a real run: learns, stops, resumes -------------------------------------------------------

STEPS = 8


def _records(run_dir: Path, kind: str = "train") -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def _torchrun(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "launch.train.launcher", "--standalone", "--nproc-per-node=2",
                             "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",  # as job.sbatch gives our launcher (torchrun)
                             "-m", "launch.train", str(run_dir)], cwd=run_dir.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # minutes of training: `pytest -m slow`
def test_tiny_dpo_learns_stops_and_resumes(tmp_path):
    """From random weights (the reference a copy of them): step 1's loss is log 2 with zero rewards; the run is
    stopped by SIGUSR1 after a few steps and resumed from its checkpoint (the reference again the initial
    weights, not the resumed policy); the loss falls below log 2 and the reward margin rises."""
    out = run_trainctl("render", "recipe=tiny_dpo", f"train.steps={STEPS}", "train.global_batch_size=4",
                       "model.seq_length=160", "train.eval_interval=4", "train.checkpoint_interval=2",
                       cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = tmp_path / "runs/tiny_dpo"
    first = _torchrun(run_dir)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.poll() is None and len(_records(run_dir)) < 3:
        time.sleep(0.2)
    first.send_signal(signal.SIGUSR1)
    out1, _ = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGUSR1, out1[-5000:]  # the launcher's code for a stop signal
    stopped_at = _records(run_dir)[-1]["step"]
    assert stopped_at < STEPS and f"stopped by SIGUSR1 at step {stopped_at}" in out1
    second = _torchrun(run_dir)
    out2, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out2[-5000:]
    assert f"resumed from {run_dir / 'checkpoints'}/step_{stopped_at:07d}" in out2

    train = _records(run_dir)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy is its reference at step 1
    assert train[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    resumed = train[stopped_at]  # the first step after the resume: still far from its reference
    assert resumed["loss"] < math.log(2) and resumed["rewards/margins"] > 0
    margins = [r["rewards/margins"] for r in train]
    assert sum(margins[-3:]) / 3 > 0.3 and train[-1]["loss"] < math.log(2) - 0.1, [
        (r["loss"], r["rewards/margins"]) for r in train]
    assert sum(r["rewards/accuracies"] for r in train[-3:]) / 3 > 0.7
    evals = _records(run_dir, "eval")
    assert [r["step"] for r in evals] == [4, 8] and evals[-1]["val_rewards/margins"] > 0
    assert (run_dir / "checkpoints/final/config.json").is_file()
    print("DPO run:", [(r["step"], round(r["loss"], 3), round(r["rewards/margins"], 3)) for r in train])
