"""The DeepSpeed trainer: ``python -m launch.train RUN_DIR`` on every rank, started by torchrun.

Reads what ``trainctl render`` wrote: ``config.yaml`` (the resolved config),
``ds_config.json`` (handed to ``deepspeed.initialize`` as is) and ``plan.json``
(the estimate: FLOPs per token for MFU, the predictions logged beside the
measurements, the checkpoint interval when ``train.checkpoint_interval`` is unset).

One step = ``gradient_accumulation_steps`` micro-batches per rank, then
``engine.step()`` (clipping, AdamW, the LR schedule of ``launch.train.schedule``).
Validation every ``train.eval_interval`` steps over ``train.eval_iters`` global
batches (the same ones each time, so the numbers compare). After every step all
ranks agree on stop signals (``launch.train.stop``): on SIGUSR1/SIGTERM they save
a checkpoint and exit 0, and the sbatch script requeues the job, which resumes
from ``latest``. At the end: a final checkpoint and the consolidated Hugging Face
model in ``{checkpoint_dir}/final`` (the next stage's ``stage.init_checkpoint``).

``stage=sft`` reads the chat JSONL sources through ``launch.train.chat`` (the loss on
the assistant tokens only when ``stage.mask_prompt``); the loss code is the same.

Exit codes: 0 done or stopped (checkpoint saved); 2 a user error found before
training (shards or chat files missing, resume with a changed config); 3 not built
(DPO, RLHF).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

from launch.config.rampup import Rampup
from launch.train import checkpoint as ckpt
from launch.train import stop
from launch.train.loop import StepLoop
from launch.train.data import MissingData, check_data
from launch.train.metrics import Reporter, err

EXIT_USER = 2
EXIT_NOT_BUILT = 3


def preflight(run_dir: Path, cfg, raw: dict) -> tuple[int, Path | None]:
    """Checks that need no torch: (exit code or 0, the step directory to resume from)."""
    kind = cfg.stage.kind.name
    if kind not in ("pretrain", "sft"):
        err(f"stage.kind={kind}: the DeepSpeed trainer trains pretrain and sft only so far")
        return EXIT_NOT_BUILT, None
    if cfg.parallel.cp > 1:
        err(f"parallel.cp={cfg.parallel.cp}: Ulysses sequence parallelism is not wired into the DeepSpeed "
            "trainer yet; use parallel.cp=1")
        return EXIT_NOT_BUILT, None
    try:
        check_data(cfg)  # the prepared shards; for sft, the chat JSONL files
    except MissingData as exc:
        err(str(exc))
        return EXIT_USER, None
    if cfg.stage.init_checkpoint and not Path(cfg.stage.init_checkpoint, "config.json").is_file():
        err(f"stage.init_checkpoint={cfg.stage.init_checkpoint}: no Hugging Face model there (config.json); "
            "it is the previous stage's {checkpoint_dir}/final")
        return EXIT_USER, None
    resume = ckpt.find_resume(ckpt.checkpoint_dir(cfg, run_dir))
    refusal = resume and ckpt.resume_refusal(resume, raw)
    if refusal:
        err(refusal)
        return EXIT_USER, None
    return 0, resume


class Trainer(StepLoop):
    def __init__(self, run_dir: Path, cfg, raw: dict, resume: Path | None):
        import deepspeed
        import torch
        import torch.distributed as dist

        from launch.backends import save_interval
        from launch.config.derive import derive
        from launch.train import model as model_mod
        from launch.train.data import build_datasets
        from launch.train.schedule import lr_function

        self.run_dir, self.cfg, self.raw = run_dir, cfg, raw
        self.ckpt_dir = ckpt.checkpoint_dir(cfg, run_dir)
        self.plan = json.loads((run_dir / "plan.json").read_text())
        self.ds_config = json.loads((run_dir / "ds_config.json").read_text())
        self.d = derive(cfg)
        self.steps = self.d.steps
        self.save_every = save_interval(cfg, self.plan) or 0

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dp = self.world // max(int(self.ds_config.get("sequence_parallel_size", 1)), 1)
        self.mbs = int(self.ds_config["train_micro_batch_size_per_gpu"])
        self.gas = int(self.ds_config["gradient_accumulation_steps"])
        self.gbs = int(self.ds_config["train_batch_size"])  # the current global batch: smaller during a ramp-up
        self.full_gbs = self.gbs
        self.ramp = Rampup.of(cfg.train.rampup_batch_size)
        self.seq = int(cfg.model.seq_length)

        self.report = Reporter(run_dir, cfg, self.plan, world=self.world, enabled=self.rank == 0)

        # Data (every rank; rank 0 builds the indices into the cache first).
        valid_samples = int(cfg.train.eval_iters) * self.full_gbs
        self.data = build_datasets(cfg, train_samples=self.d.samples, valid_samples=valid_samples,
                                   cache_dir=run_dir / "data_cache")

        # Model, optimizer (the ds_config's AdamW), schedule.
        torch.manual_seed(int(cfg.train.seed))
        from launch.train.data import eod_id

        model = model_mod.build(cfg, self.ds_config, eod=eod_id(cfg.data.tokenizer)[1])  # recompute applied
        self.n_params = model_mod.n_params(model)
        peak = float(self.ds_config.get("optimizer", {}).get("params", {}).get("lr", self.d.lr))
        self.lr_fn = lr_function(cfg, peak=peak, steps=self.steps)
        lr_fn = self.lr_fn

        def scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_fn(s) / peak)

        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=_param_groups(model, float(cfg.optim.weight_decay)),
            config=str(run_dir / "ds_config.json"), lr_scheduler=scheduler)
        self.device = self.engine.device

        self.step, self.consumed = 0, 0
        if resume is not None:
            self._load(resume)

    # --- the loop ------------------------------------------------------------------------------

    def start_message(self) -> str:
        kind = "resuming" if self.step else "starting"
        return (f"{kind} {self.cfg.name} at step {self.step}/{self.steps}: {self.n_params / 1e6:.2f}M parameters, "
                f"{self.world} rank(s), micro {self.mbs} x accum {self.gas} x dp {self.dp} = {self.gbs} sequences of "
                f"{self.seq} tokens, ZeRO {self.ds_config.get('zero_optimization', {}).get('stage', 0)}, "
                f"checkpoint every {self.save_every or 'never'} step(s) to {self.ckpt_dir}")

    def set_batch(self, batch: int) -> None:
        """A batch ramp-up changes the micro-batches per step (DeepSpeed's set_train_batch_size)."""
        if batch != self.gbs:
            self.engine.set_train_batch_size(batch)
            self.gbs, self.gas = batch, batch // (self.mbs * self.dp)

    def train_step(self) -> tuple[float, float, float | None]:
        """One optimizer step: (this rank's mean loss, the step's learning rate, the global grad norm)."""
        from launch.train.data import micro_batch

        lr = self.lr_fn(self.step)
        total = 0.0
        self.engine.train()
        for micro in range(self.gas):
            # Said explicitly: DeepSpeed's own count (micro-steps mod gas) breaks when a ramp-up changes gas.
            self.engine.set_gradient_accumulation_boundary(micro == self.gas - 1)
            tokens, labels, mask = (t.to(self.device) for t in micro_batch(
                self.data.train, first_sample=self.consumed, micro=micro, micro_batch_size=self.mbs,
                dp_rank=self.rank % self.dp, dp=self.dp))
            loss = self._loss(tokens, labels, mask)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.item()
        gn = self.engine.get_global_grad_norm()
        return total / self.gas, lr, float(gn) if gn is not None else None

    def window_loss(self, losses: list[float]) -> float:
        """The mean over the window and the ranks."""
        import torch
        import torch.distributed as dist

        mean = torch.tensor(sum(losses) / len(losses), device=self.device)
        dist.all_reduce(mean)
        return mean.item() / self.world

    def _loss(self, tokens, labels, mask):
        """The objective (cross-entropy, plus optim.z_loss when set: launch/train/loss.py)."""
        from launch.train.loss import lm_loss

        logits = self.engine(input_ids=tokens).logits
        return lm_loss(logits, labels, mask, float(self.cfg.optim.z_loss))[0]

    def evaluate(self) -> None:
        import torch
        import torch.distributed as dist

        from launch.train.data import micro_batch

        self.engine.eval()
        iters = int(self.cfg.train.eval_iters)
        total = torch.zeros(2, device=self.device)
        with torch.no_grad():
            for it in range(iters):
                for micro in range(self.full_gbs // (self.mbs * self.dp)):  # full batches: the numbers compare
                    tokens, labels, mask = (t.to(self.device) for t in micro_batch(
                        self.data.valid, first_sample=it * self.full_gbs, micro=micro, micro_batch_size=self.mbs,
                        dp_rank=self.rank % self.dp, dp=self.dp))
                    total[0] += self._loss(tokens, labels, mask).detach()
                    total[1] += 1
        dist.all_reduce(total)
        self.engine.train()
        self.report.eval(step=self.step, loss=(total[0] / total[1]).item(), iters=iters)

    # --- checkpoints ---------------------------------------------------------------------------

    def save(self) -> Path:
        import torch
        import torch.distributed as dist

        tmp_tag = f".tmp_{ckpt.step_name(self.step)}"
        tmp = self.ckpt_dir / tmp_tag
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a save of this step that a kill interrupted
        dist.barrier()
        t0 = time.perf_counter()
        client = {"trainctl": {"step": self.step, "consumed_samples": self.consumed}}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tmp_tag, client_state=client, save_latest=False)
        torch.save(ckpt.rng_state(), tmp / f"rng_rank{self.rank}.pt")
        dist.barrier()
        final = self.ckpt_dir / ckpt.step_name(self.step)
        if self.rank == 0:
            ckpt.commit(self.ckpt_dir, tmp_tag, self.step, {
                "step": self.step, "consumed_samples": self.consumed, "world_size": self.world,
                "config": self.raw, "time": time.time()})
            self.report.event(f"checkpoint {final} ({time.perf_counter() - t0:.1f} s)")
        dist.barrier()
        return final

    def _load(self, step_dir: Path) -> None:
        import torch

        marker = ckpt.read_marker(step_dir)
        if marker.get("world_size") not in (None, self.world):
            raise SystemExit(f"trainctl: {step_dir} was saved by {marker['world_size']} ranks, this job has {self.world}")
        path, client = self.engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name)
        if path is None:
            raise SystemExit(f"trainctl: DeepSpeed could not load the checkpoint {step_dir}")
        self.step = int(marker["step"])
        self.consumed = int(marker["consumed_samples"])
        rng = step_dir / f"rng_rank{self.rank}.pt"
        if rng.is_file():
            ckpt.set_rng_state(torch.load(rng, weights_only=False))
        # The schedule follows this run's train.steps (it may have been extended): set this step's rate.
        sched = self.engine.lr_scheduler
        if sched is not None:
            sched.last_epoch = self.step
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self.lr_fn(self.step)
        self.report.event(f"resumed from {step_dir}: step {self.step}, {self.consumed} samples consumed")
        self.report.rewind(self.step)

    def finish(self) -> str:
        final = self.export()
        return f"final checkpoint {self.ckpt_dir / ckpt.step_name(self.step)}, Hugging Face model {final}"

    def export(self) -> Path:
        """The consolidated Hugging Face model, in ``{checkpoint_dir}/final`` (rank 0 writes; all ranks gather)."""
        import torch.distributed as dist

        final = self.ckpt_dir / "final"
        if self.engine.zero_optimization_partition_weights():
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict() if self.rank == 0 else None
        if self.rank == 0:
            tmp = self.ckpt_dir / ".tmp_final"
            shutil.rmtree(tmp, ignore_errors=True)
            self.engine.module.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            tok = Path(self.cfg.data.tokenizer)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                src = tok if name == "tokenizer.json" and tok.is_file() else tok.parent / name
                if src.is_file():
                    shutil.copy(src, tmp / name)
            (tmp / "trainctl.json").write_text(json.dumps({"step": self.step, "config": self.raw}, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        dist.barrier()
        return final

    def close(self) -> None:
        import torch.distributed as dist

        self.report.close()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not norms, biases): Megatron's and Hugging Face's rule."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)
        (decay if len(shape) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def main(run_dir: Path) -> int:
    cfg, raw = ckpt.load_config(run_dir)
    code, resume = preflight(run_dir, cfg, raw)
    if code:
        return code
    stop.install()
    # torch 2.13 deprecates the collectives DeepSpeed 0.19 calls: one warning per call, thousands per run.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    trainer = Trainer(run_dir, cfg, raw, resume)
    try:
        return trainer.train()
    finally:
        trainer.close()
