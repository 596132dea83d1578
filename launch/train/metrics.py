"""What the trainer reports: one line and one ``RUN_DIR/metrics.jsonl`` object per logged step, and wandb.

Throughput uses the estimator's conventions (plan.json), so the measured numbers
sit next to the predicted ones: model FLOPs per token = ``flops.per_token``
(Megatron-LM's count, no recompute), TFLOP/s per GPU = tokens/s x that / world size,
MFU against ``cluster.gpu.peak_bf16_tflops`` (``peak_fp8_tflops`` when
``estimate.mfu_basis=fp8``). Peak memory: ``torch.cuda.max_memory_allocated`` on a
GPU (``memory_kind: cuda_max_allocated``), the process's peak RSS on a CPU
(``memory_kind: cpu_peak_rss``), in GiB.

wandb (rank 0 only), from the config's ``wandb`` section: offline unless
``wandb.mode=online`` or ``WANDB_MODE`` says otherwise (``WANDB_API_KEY`` comes from
the submitting shell, never from a file), files under RUN_DIR (``WANDB_DIR``), one
run id per run directory (``RUN_DIR/wandb_id``) so every resumed job appends to the
same wandb run. Name: ``cfg.name``, or ``NAME/POINT`` for a sweep point; group
``wandb.group`` or ``cfg.name`` (a sweep's points share it); tags: stage, backend,
``wandb.tags`` and the point's command-line overrides (``parallel.tp=2``). The
ds_config has no ``wandb`` section: DeepSpeed's own monitor would open a second,
empty run. Our metrics are logged against ``trainer/step``.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from launch.config.derive import mfu_peak_tflops
from launch.record import goodput
from launch.record.outcome import step_key
from launch.record.read import read_overrides

GIB = 1024 ** 3
PROCESS_START = time.time()
"""About when this rank's process started (``launch.train.__main__`` imports this module first): a job
step's ``job_start`` record, so that building and loading count in the goodput's wall time."""


def peak_memory_gib() -> tuple[float, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / GIB, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, "cpu_peak_rss"


def wandb_name_and_tags(cfg, run_dir: Path) -> tuple[str, list[str]]:
    """(run name, tags): a sweep point (runs/NAME/POINT) is NAME/POINT, tagged with its overrides."""
    name = str(cfg.name)
    if run_dir.parent.name == name:
        name = f"{name}/{run_dir.name}"
    tags = [f"stage={cfg.stage.kind.name}", f"backend={cfg.backend.name.name}", *map(str, cfg.wandb.tags)]
    tags += [o for o in read_overrides(run_dir) if "=" in o]
    return name, [t[:64] for t in dict.fromkeys(tags)]  # wandb caps a tag at 64 characters


class Reporter:
    """Rank 0's metrics: stdout, metrics.jsonl, wandb. Other ranks get a Reporter that does nothing."""

    def __init__(self, run_dir: Path, cfg, plan, *, world: int, enabled: bool):
        """``plan``: the run's ``launch.record.read.PlanNumbers`` (the predictions logged beside the measurements)."""
        self.enabled = enabled
        self.run_dir = run_dir
        self.world = world
        self.plan = plan
        self.flops_per_token = plan.flops.per_token
        self.peak_tflops = mfu_peak_tflops(cfg)
        thr = plan.throughput
        self.predicted = {
            "plan_step_time_s": thr.step_time_s,
            "plan_tokens_per_s_per_gpu": thr.tokens_per_s_per_gpu,
            "plan_tflops_per_gpu": thr.tflops_per_gpu,
            "plan_mfu": thr.mfu,
            "plan_peak_memory_gib": plan.memory_gib.per_gpu_peak,
        }
        self.wandb = None
        self._file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        if enabled:
            self._init_wandb(cfg)
            self._write({"kind": "job_start", "job": step_key(), "time": PROCESS_START})  # launch.record.goodput

    # --- wandb ---------------------------------------------------------------------------------

    def _init_wandb(self, cfg) -> None:
        mode = os.environ.get("WANDB_MODE") or cfg.wandb.mode.name
        if mode == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true"):
            return
        os.environ["WANDB_MODE"] = mode
        os.environ.setdefault("WANDB_DIR", str(self.run_dir))
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb
        except ImportError:
            print("trainctl: wandb is not installed; metrics go to metrics.jsonl only", flush=True)
            return
        id_file = self.run_dir / "wandb_id"
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
            id_file.write_text(run_id + "\n")
        name, tags = wandb_name_and_tags(cfg, self.run_dir)
        self.wandb = wandb.init(
            project=cfg.wandb.project, entity=cfg.wandb.entity, group=cfg.wandb.group or str(cfg.name),
            name=name, tags=tags, id=run_id, resume="allow", dir=str(self.run_dir),
            config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True),
        )
        self.wandb.define_metric("trainer/step")
        self.wandb.define_metric("train/*", step_metric="trainer/step")
        self.wandb.define_metric("val/*", step_metric="trainer/step")

    # --- records -------------------------------------------------------------------------------

    def train_step(self, *, step: int, loss: float, lr: float, grad_norm: float | None, steps: int,
                   step_time_s: float, tokens: int, consumed_samples: int,
                   global_batch_size: int | None = None, counters: dict | None = None) -> dict | None:
        """Log one training step: ``tokens`` processed (all ranks) in ``step_time_s`` seconds (averaged)."""
        if not self.enabled:
            return None
        tokens_per_s = tokens / step_time_s if step_time_s > 0 else 0.0
        tflops = tokens_per_s * self.flops_per_token / self.world / 1e12
        mem, kind = peak_memory_gib()
        rec = {
            "kind": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "step_time_s": step_time_s, "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / self.world,
            "tflops_per_gpu": tflops, "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "peak_memory_gib": mem, "memory_kind": kind, "consumed_samples": consumed_samples,
            "global_batch_size": global_batch_size, "time": time.time(), **self.predicted, **(counters or {}),
        }
        gn = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
        print(f"step {step}/{steps} | loss {loss:.4f} | lr {lr:.3e} | grad norm {gn} | "
              f"{tokens_per_s:,.0f} tokens/s | {tflops:.3g} TFLOP/s/GPU (plan {self._p('plan_tflops_per_gpu')}) | "
              f"MFU {100 * (rec['mfu'] or 0):.1f}% (plan {100 * (self.predicted['plan_mfu'] or 0):.1f}%) | "
              f"{'peak RSS' if kind == 'cpu_peak_rss' else 'peak mem'} {mem:.2f} GiB "
              f"(plan {self._p('plan_peak_memory_gib')})", flush=True)
        self._write(rec)
        self._to_wandb("log", {"trainer/step": step, **{f"train/{k}": v for k, v in rec.items()
                                                       if isinstance(v, (int, float)) and v is not None
                                                       and k not in ("step", "time")}})
        return rec

    def eval(self, *, step: int, loss: float, iters: int, extra: dict | None = None) -> None:
        if not self.enabled:
            return
        import math

        ppl = math.exp(loss) if loss < 50 else float("inf")
        print(f"validation at step {step}: loss {loss:.4f} | perplexity {ppl:.2f} ({iters} batches)", flush=True)
        extra = {f"val_{k}": v for k, v in (extra or {}).items()}
        self._write({"kind": "eval", "step": step, "val_loss": loss, "val_ppl": ppl, **extra, "time": time.time()})
        self._to_wandb("log", {"trainer/step": step, "val/loss": loss, "val/ppl": ppl,
                               **{f"val/{k[4:]}": v for k, v in extra.items()}})

    def rewind(self, step: int) -> int:
        """On resume from ``step``: records of later steps describe work a crash threw away.

        They stay in metrics.jsonl (nothing is lost) with ``kind`` prefixed ``discarded_``, so readers
        that follow ``kind == "train"`` see one continuous curve. Returns how many were marked.
        """
        if not self.enabled:
            return 0
        self._write({"kind": "resume", "step": step, "time": time.time()})  # launch.record.goodput
        path = self.run_dir / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        marked = 0
        for rec in records:
            if rec.get("kind") in ("train", "eval") and rec.get("step", 0) > step:
                rec["kind"] = f"discarded_{rec['kind']}"
                marked += 1
        if marked:
            self._file.close()
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            os.replace(tmp, path)
            self._file = open(path, "a")
            self.event(f"{marked} record(s) in metrics.jsonl after step {step} came from work thrown away (a job "
                       "that ended without a checkpoint, or a rewind past a loss spike); marked discarded_*")
        return marked

    def record(self, kind: str, **fields) -> None:
        """One event record in metrics.jsonl (``kind``: skip, rewind, diverged: launch/train/guard.py)."""
        if self.enabled:
            self._write({"kind": kind, **fields, "time": time.time()})

    def event(self, text: str) -> None:
        if self.enabled:
            print(f"trainctl: {text}", flush=True)

    def report_goodput(self) -> None:
        """The run's goodput so far, across its jobs (``launch.record.goodput``): metrics.jsonl, stdout, wandb."""
        if not self.enabled or self._file is None:
            return
        figures = goodput.of(self.run_dir, running=True, now=time.time())
        self._write({**figures.record(), "time": time.time()})
        self.event(figures.line())
        if self.wandb is not None:
            self.wandb.log({f"goodput/{k}": v for k, v in figures.record().items() if isinstance(v, (int, float))})

    def close(self) -> None:
        self.report_goodput()
        if self._file:
            self._file.close()
            self._file = None
        self._to_wandb("finish")
        self.wandb = None

    def _to_wandb(self, method: str, *args) -> None:
        """Call the wandb run's ``method``; wandb is a side channel that must never end a run.

        Its service process is one more process of the job step, so the SIGTERM Slurm sends every
        process of a preempted or cancelled step ends it while the ranks are still saving their
        checkpoint. Then: one line, wandb off for the rest of this job, metrics.jsonl keeps every record.
        """
        if self.wandb is None:
            return
        try:
            getattr(self.wandb, method)(*args)
        except Exception as exc:  # noqa: BLE001 -- whatever wandb raises, training goes on
            self.wandb = None
            first = next((line for line in str(exc).splitlines() if line.strip()), "")
            self.event(f"wandb stopped ({type(exc).__name__}: {first}); metrics go to metrics.jsonl only "
                       "for the rest of this job")
            try:
                import wandb

                wandb.teardown()  # unregisters its exit hook, which would print the same error again
            except Exception:  # noqa: BLE001
                pass

    def _p(self, key: str) -> str:
        v = self.predicted.get(key)
        return f"{v:.3g}" if isinstance(v, (int, float)) else "n/a"

    def _write(self, rec: dict) -> None:
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()


def err(text: str) -> None:
    """A user-facing error, printed once (by global rank 0) before the process group exists."""
    if os.environ.get("RANK", "0") == "0":
        print(f"trainctl: {text}", file=sys.stderr, flush=True)
