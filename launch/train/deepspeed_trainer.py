"""The DeepSpeed engine behind the trainer skeleton (``launch.train.loop``): ``DeepSpeedModule``.

Reads what ``trainctl render`` wrote: ``ds_config.json`` (handed to
``deepspeed.initialize`` as is) beside the run record. The model is a Hugging Face
Llama/Mixtral (``launch.train.model``); with ``parallel.recompute=full`` Hugging
Face's per-layer activation checkpointing is on.

One step = ``micro_batches`` micro-batches per rank, then ``engine.step()``
(clipping, AdamW, the LR schedule of ``launch.train.schedule``). A checkpoint is
DeepSpeed's own (model, optimizer, scheduler shards of every rank) in the step
directory the skeleton gives; the export is the consolidated Hugging Face model
(with the tokenizer's files), the next stage's ``stage.init_checkpoint``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from launch.compat import DEEPSPEED_MICRO_STEPS, DEEPSPEED_ZERO3_GATHER, require
from launch.config.schema import BackendName
from launch.errors import UserError
from launch.record import fingerprint
from launch.record.read import PlanNumbers, RunConfig, read_backend_file
from launch.train import guard
from launch.train import model as model_mod
from launch.train.data import eod_id
from launch.train.loss import lm_loss
from launch.train.module import TrainModule
from launch.train.preflight import ENGINES, cpu_devices, resolve_init
from launch.train.schedule import lr_function


class DeepSpeedModule(TrainModule):
    export_kind = "Hugging Face model"

    def __init__(self, run_dir: Path, record: RunConfig, plan: PlanNumbers):
        require(DEEPSPEED_ZERO3_GATHER)  # private, used by the export: checked now, not after days of training
        require(DEEPSPEED_MICRO_STEPS)  # public, but its meaning is what the ramp-up relies on
        cfg = record.cfg
        self.cfg = cfg
        self.ds_config = read_backend_file(run_dir, "ds_config.json")

        cuda = not cpu_devices(cfg)
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dp = self.world // max(int(self.ds_config.get("sequence_parallel_size", 1)), 1)
        self.dp_rank = self.rank % self.dp
        self.mbs = int(self.ds_config["train_micro_batch_size_per_gpu"])
        self.micro_batches = int(self.ds_config["gradient_accumulation_steps"])

        torch.manual_seed(cfg.train.seed)
        model = model_mod.build(cfg, self.ds_config, eod=eod_id(cfg.data.tokenizer)[1])  # recompute applied
        init = resolve_init(cfg, ENGINES[BackendName.deepspeed])
        if init:  # loaded whole by the build (before deepspeed.initialize partitions it)
            self.init_fingerprint = fingerprint.of_model(model.state_dict(), init.path)
        self.n_params = model_mod.n_params(model)
        peak = float(self.ds_config.get("optimizer", {}).get("params", {}).get("lr", record.derived.lr))
        self.lr_fn = lr_function(cfg, peak=peak, steps=record.derived.steps)
        lr_fn = self.lr_fn

        def scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_fn(s) / peak)

        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=_param_groups(model, cfg.optim.weight_decay),
            config=str(run_dir / "ds_config.json"), lr_scheduler=scheduler)
        self.device = self.engine.device
        self.faults = guard.Faults()

    def describe(self) -> str:
        return f"{self.world} rank(s), ZeRO {self.ds_config.get('zero_optimization', {}).get('stage', 0)}"

    def set_batch(self, micro_batches: int) -> None:
        """A batch ramp-up changes the micro-batches per step (DeepSpeed's set_train_batch_size)."""
        self.engine.set_train_batch_size(micro_batches * self.mbs * self.dp)
        self.micro_batches = micro_batches

    def train_step(self, step: int, batches: list) -> tuple[float, float, float | None]:
        """One optimizer step: (this rank's mean loss, the step's learning rate, the global grad norm).

        A step whose gradient norm is not finite DeepSpeed discards itself (ZeRO-3, and every stage at
        bf16: ``engine.skipped_steps``); a non-finite loss on any rank makes every rank's gradients non-finite
        through the reduction. Such a step is ``step_skipped``; the LR schedule still advances (it follows
        the step count, as a skipped step's batch is consumed)."""
        total = 0.0
        fault = self.faults.kind(step + 1)
        skipped = self.engine.skipped_steps
        self.engine.train()
        for i, (tokens, labels, mask) in enumerate(batches):
            # Said explicitly: DeepSpeed's own count (micro-steps mod gas) breaks when a ramp-up changes gas.
            self.engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
            loss = guard.apply_fault(self._loss(tokens, labels, mask), fault, here=self.rank == 0)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.item()
        gn = self.engine.get_global_grad_norm()
        gn = float(gn) if gn is not None else None
        agreed = torch.tensor([total, len(batches)], dtype=torch.float64, device=self.device)
        dist.all_reduce(agreed)  # guard's one collective: a non-finite loss anywhere makes the sum non-finite
        self.step_loss = (agreed[0] / agreed[1]).item()
        self.step_skipped = self.engine.skipped_steps > skipped
        if self.step_skipped and self.engine.lr_scheduler is not None:
            self.engine.lr_scheduler.step()  # DeepSpeed holds the schedule on a step it discards
        elif not (guard.finite(self.step_loss) and (gn is None or guard.finite(gn))):
            raise guard.Diverged(f"step {step + 1}: loss {self.step_loss}, grad norm {gn}, and DeepSpeed applied "
                                 f"the update (ZeRO stage {self.engine.zero_optimization_stage()} discards no "
                                 "non-finite step at this precision): the weights are no longer trustworthy",
                                 step + 1)
        if self.rank == 0 and self.faults.weight:
            guard.corrupt_weight(self.faults, step + 1, (getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()))
        return total / len(batches), self.lr_fn(step), gn

    def params_finite(self) -> bool:
        """This rank's parameters (its ZeRO-3 partitions) all finite, on every rank."""
        ok = torch.stack([torch.isfinite(getattr(p, "ds_tensor", p).data).all()
                          for p in self.engine.module.parameters()]).all()
        bad = (~ok).to(torch.float32).reshape(1).to(self.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bad.item()

    def eval_step(self, batches: list) -> float:
        return (sum(self._loss(*batch).detach() for batch in batches) / len(batches)).item()  # one sync

    @contextlib.contextmanager
    def evaluating(self):
        self.engine.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.engine.train()

    def mean_loss(self, items: list) -> float:
        """The mean over the items and the ranks (every rank has as many micro-batches)."""
        mean = torch.tensor(sum(items) / len(items), device=self.device)
        dist.all_reduce(mean)
        return mean.item() / self.world

    def _loss(self, tokens, labels, mask):
        """The objective (cross-entropy, plus optim.z_loss when set: launch/train/loss.py)."""
        logits = self.engine(input_ids=tokens).logits
        return lm_loss(logits, labels, mask, self.cfg.optim.z_loss)[0]

    # --- checkpoints ---------------------------------------------------------------------------

    def save_shards(self, directory: Path, client_state: dict) -> None:
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name,
                                    client_state={"trainctl": client_state}, save_latest=False)

    def load(self, step_dir: Path, marker: dict, step: int) -> None:
        if marker.get("world_size") not in (None, self.world):
            raise UserError(f"{step_dir} was saved by {marker['world_size']} ranks, this job has {self.world}: "
                            "ZeRO shards reload only on the same number\n  fix: resume with the cluster.nodes "
                            "and cluster.gpus_per_node it was saved with")
        path, _ = self.engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name)
        if path is None:
            raise UserError(f"DeepSpeed could not load the checkpoint {step_dir}")
        # The schedule follows this run's train.steps (it may have been extended): set this step's rate.
        if self.engine.lr_scheduler is not None:
            self.engine.lr_scheduler.last_epoch = step
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self.lr_fn(step)

    def export(self, directory: Path, last_step: Path) -> None:
        """The consolidated Hugging Face model and the tokenizer's files (all ranks gather, rank 0 writes)."""
        if self.engine.zero_optimization_partition_weights():
            state = self.engine._zero3_consolidated_16bit_state_dict()  # compat.DEEPSPEED_ZERO3_GATHER
        else:
            state = self.engine.module.state_dict() if self.rank == 0 else None
        if self.rank != 0:
            return
        self.engine.module.save_pretrained(str(directory), state_dict=state, safe_serialization=True)
        model_mod.copy_tokenizer(self.cfg.data.tokenizer, directory)

    def close(self) -> None:
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
