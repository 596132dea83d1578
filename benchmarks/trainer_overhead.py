"""Trainer overhead: `python -m launch.train` against a plain PyTorch + DeepSpeed loop on the same model.

Both run under torchrun with the same run directory's ds_config.json (ZeRO stage,
buckets, batch), the same Hugging Face model built the same way, and the same
micro-batches x accumulation per step; the plain loop feeds random tokens and does
nothing else (no data pipeline, metrics, stop agreement, eval or checkpoints).
Reported: median tokens/s over the steps after warm-up; target: the trainer
within 10% of the plain loop.

    .venv/bin/python benchmarks/trainer_overhead.py [--steps 12] [--nproc 2] [extra render overrides...]

On this machine (2 CPU cores) it renders recipe=tiny_local with checkpoints and
eval pushed past the end, so both loops time training steps alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WARMUP = 3


def plain_worker(run_dir: Path, steps: int) -> None:
    import deepspeed
    import torch
    import torch.nn.functional as F

    from launch.record.read import read_config
    from launch.train.model import build

    cfg = read_config(run_dir).cfg
    ds = json.loads((run_dir / "ds_config.json").read_text())
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    model = build(cfg, ds)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    mbs, gas = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    seq, vocab = int(cfg.model.seq_length), int(cfg.model.vocab_size)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(gas):
            tokens = torch.randint(0, vocab, (mbs, seq + 1))
            logits = engine(input_ids=tokens[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, vocab), tokens[:, 1:].reshape(-1))
            engine.backward(loss)
            engine.step()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        tok = ds["train_batch_size"] * seq
        print("PLAIN " + json.dumps([tok / t for t in times]), flush=True)


def torchrun(nproc: int, *args: str, env: dict) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    return out.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if a.worker:
        plain_worker(Path(a.worker), a.steps)
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "WANDB_MODE": "disabled"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from launch.train.data import write_shards

        write_shards({"prose": (str(ROOT / "data/sample/prose.jsonl"), "text"),
                      "code": (str(ROOT / "data/sample/code.jsonl"), "text")},
                     str(ROOT / "data/sample/tokenizer.json"), tmp / "prepared")
        overrides = ["recipe=tiny_local", f"data.prepared_dir={tmp / 'prepared'}", f"train.steps={a.steps}",
                     f"train.checkpoint_interval={a.steps + 1}", f"train.eval_interval={a.steps + 1}",
                     f"cluster.gpus_per_node={a.nproc}", *a.overrides]
        r = subprocess.run([sys.executable, "-m", "launch", "render", *overrides], cwd=tmp, env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(r.stderr)
        run_dir = tmp / "runs" / "tiny_local"
        t0 = time.perf_counter()
        plain = json.loads(torchrun(a.nproc, __file__, "--worker", str(run_dir), "--steps", str(a.steps), env=env)
                           .split("PLAIN ", 1)[1].splitlines()[0])
        t1 = time.perf_counter()
        torchrun(a.nproc, "-m", "launch.train", str(run_dir), env=env)
        t2 = time.perf_counter()
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        trainer = [r["tokens_per_s"] for r in recs if r["kind"] == "train"]
    p, t = statistics.median(plain[WARMUP:]), statistics.median(trainer[WARMUP:])
    print(f"plain DeepSpeed loop: {p:,.0f} tokens/s (median of steps {WARMUP + 1}-{a.steps}; run {t1 - t0:.0f} s)")
    print(f"launch.train:         {t:,.0f} tokens/s (same steps; run {t2 - t1:.0f} s, incl. data, final checkpoint, "
          "export)")
    print(f"trainer / plain:      {t / p:.3f}  ({'within' if t >= 0.9 * p else 'NOT within'} 10%)")


if __name__ == "__main__":
    main()
