"""The Megatron-Core engine behind the trainer skeleton (``launch.train.loop``): ``MegatronModule``.

Reads ``megatron.yaml`` (one mapping of constructor arguments per megatron-core
object, written by ``launch.backends.megatron``) beside the run record; builds
the model (``build.py``), runs megatron-core's pipeline schedule for a step, and
saves, loads and exports distributed checkpoints (``state.py``). The export (``final/``) is a
Hugging Face model, as the DeepSpeed trainer's (``hf.py``: Llama and Mixtral; every rank converts a
share of the tensors), with the last step's distributed checkpoint beside it in ``final/megatron/``
(hard links): either is the next stage's ``stage.init_checkpoint``, whichever backend runs it. A
model outside those families exports ``final/megatron/`` only. ``stage.init_checkpoint`` loads
weights only: a distributed checkpoint of any layout, or a Hugging Face model imported through the
same mapping. ``stage=dpo`` adds a frozen reference model, loaded the same ways, and runs the
schedule twice per step (``dpo.py``); the rest is the same for every stage.

On a CPU cluster profile (``cluster.gpu.name: cpu``) ``launch.train.cuda_on_cpu``
redirects megatron-core's CUDA calls to the CPU (a test mode; real runs need GPUs).
"""

from __future__ import annotations

import contextlib
import os
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from launch.compat import (MEGATRON_ADAM_DUMMY_STATE, MEGATRON_ADAM_SET_STATES, MEGATRON_WRITE_RESULTS_QUEUE,
                           require)
from launch.config.schema import BackendName, StageKind
from launch.errors import UserError
from launch.record.read import PlanNumbers, RunConfig, read_backend_file
from launch.train import guard
from launch.train.init_source import MEGATRON_SUBDIR, Format, InitSource, llama_problem
from launch.train.module import TrainModule
from launch.train.preflight import ENGINES, cpu_devices, resolve_reference


class MegatronModule(TrainModule):
    export_kind = "Hugging Face model (its Megatron-Core distributed checkpoint in megatron/)"

    def __init__(self, run_dir: Path, record: RunConfig, plan: PlanNumbers):
        self.cfg = record.cfg
        self.no_hf = llama_problem(record.cfg)
        if self.no_hf:
            self.export_kind = f"Megatron-Core distributed checkpoint in {MEGATRON_SUBDIR}/ (no Hugging Face model: {self.no_hf})"
        cuda = not cpu_devices(record.cfg)
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        else:
            from launch.train import cuda_on_cpu

            cuda_on_cpu.install()
        from launch.train.megatron import build, state  # after cuda_on_cpu: megatron-core reads torch.cuda

        require(MEGATRON_ADAM_DUMMY_STATE)  # private, used on every resume: checked now, not days later
        require(MEGATRON_ADAM_SET_STATES)
        require(MEGATRON_WRITE_RESULTS_QUEUE)

        self._state = state
        dist.init_process_group("nccl" if cuda else "gloo")
        self.device = torch.device("cuda") if cuda else torch.device("cpu")
        # Stop flags are CPU tensors: over gloo on GPU nodes too.
        self.stop_group = dist.new_group(backend="gloo") if cuda else None
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

        self.doc = read_backend_file(run_dir, "megatron.yaml")
        t = self.doc["training"]
        self.mbs, self.seq = int(t["micro_batch_size"]), int(t["seq_length"])
        self.micro_batches = int(t["num_microbatches"])
        self.built = build.build(self.doc, self.device)
        state.prepare_saves()  # before any stop signal can arrive (launch/train/megatron/state.py)
        self.ps = build.ps
        self.dpo = None  # stage=dpo: the frozen reference and the preference loss (launch/train/megatron/dpo.py)
        if record.cfg.stage.kind == StageKind.dpo:
            from launch.train.megatron.dpo import DpoObjective

            self.dpo = DpoObjective(doc=self.doc, stage=record.cfg.stage, device=self.device, mbs=self.mbs,
                                    seq=self.seq, source=resolve_reference(record.cfg, ENGINES[BackendName.megatron]),
                                    hf_config=self._hf_config)
        self.dp, self.dp_rank = self.ps.get_data_parallel_world_size(), self.ps.get_data_parallel_rank()
        self.faults, self._fault = guard.Faults(), None
        self.last_stage_reporter = self.ps.is_pipeline_last_stage() and self.ps.get_tensor_model_parallel_rank() == 0
        self.position_ids = torch.arange(self.seq, device=self.device).unsqueeze(0).expand(self.mbs, -1)
        # Parameters counted once: every rank's local count over the tp x pp x ep ranks of one dp replica.
        n = torch.tensor([self.built.n_params_local if self.dp_rank == 0 else 0], dtype=torch.float64,
                         device=self.device)
        dist.all_reduce(n)
        self.n_params = int(n.item())

    def describe(self) -> str:
        mp = self.doc["model_parallel"]
        return (f"{self.world} rank(s) = tp {mp['tensor_model_parallel_size']} x pp "
                f"{mp['pipeline_model_parallel_size']} (vpp {self.built.vpp}) x cp {mp['context_parallel_size']} "
                f"x dp {self.dp}" + (f"; {self.dpo.describe()}" if self.dpo else ""))

    def layout(self) -> dict:
        mp = self.doc["model_parallel"]
        return {"tp": mp["tensor_model_parallel_size"], "pp": mp["pipeline_model_parallel_size"],
                "vpp": self.built.vpp, "dp": self.dp}

    # --- steps ---------------------------------------------------------------------------------

    def _run_schedule(self, batches: list, forward_only: bool):
        """One pass of the pipeline schedule over ``batches`` (DPO: the reference's, then the policy's);
        [loss sum, count, ...] on the reporting ranks (zeros elsewhere)."""
        step, width = self._forward_step, 2
        if self.dpo:
            from launch.train.megatron.dpo import WIDTH

            batches = self.dpo.batches(self._schedule, batches)
            step, width = self.dpo.policy_step(self._fault, self.dp_rank == 0), WIDTH
        losses = self._schedule(self.built.chunks, step, batches, forward_only=forward_only)
        sums = torch.zeros(width, dtype=torch.float64)
        if self.last_stage_reporter:
            for item in losses:
                sums += item["lm loss"].detach().to("cpu", torch.float64)
        return sums

    def _schedule(self, chunks: list, forward_step, batches: list, *, forward_only: bool) -> list:
        """megatron-core's schedule over ``chunks`` (one per virtual stage): what the loss functions reported."""
        iterators = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
        rows = batches[0][0].shape[0]  # sequences per micro-batch: mbs, or 2 x mbs for DPO's pairs
        return self.built.forward_backward(
            forward_step_func=forward_step, data_iterator=iterators, model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(batches), seq_length=self.seq, micro_batch_size=rows,
            decoder_seq_length=self.seq, forward_only=forward_only)

    def _forward_step(self, data_iterator, model):
        tokens, labels, mask = next(data_iterator)
        output = model(tokens, self.position_ids, None, labels=labels)
        return output, partial(_loss_func, mask, self._fault, self.dp_rank == 0)

    def train_step(self, step: int, batches: list):
        """One optimizer step: (loss sums of this rank, the step's learning rate, the global grad norm)."""
        for chunk in self.built.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        optimizer = self.built.optimizer
        optimizer.zero_grad()
        self._fault = self.faults.kind(step + 1)
        try:
            sums = self._run_schedule(batches, forward_only=False)
        finally:
            self._fault = None
        self.built.scheduler.step(increment=1)
        lr = optimizer.param_groups[0]["lr"]
        agreed = sums.to(self.device)
        dist.all_reduce(agreed)  # guard's one collective: [loss sum, tokens] from the loss-reporting ranks
        self.step_loss = self._loss(agreed)
        self.step_skipped, grad_norm = True, None
        if guard.finite(self.step_loss):
            # megatron-core's step discards non-finite gradients only under an fp16 loss scale, which
            # trainctl never uses: ask the norm first (one more norm pass; prepare_grads copies the
            # gradients and runs again, the same, inside step()), then step only on a finite one.
            optimizer.prepare_grads()
            grad_norm = float(optimizer.get_grad_norm())
            if guard.finite(grad_norm):
                ok, grad_norm, _ = optimizer.step()
                self.step_skipped = not ok
                grad_norm = float(grad_norm) if grad_norm is not None else None
        if self.rank == 0 and self.faults.weight:
            guard.corrupt_weight(self.faults, step + 1, (p for c in self.built.chunks for p in c.parameters()))
        return sums, lr, grad_norm

    def params_finite(self) -> bool:
        """Every model chunk's parameters on this rank finite, on every rank (the flag over the world)."""
        with self._params_gathered():
            ok = torch.stack([torch.isfinite(p.data).all() for c in self.built.chunks for p in c.parameters()]).all()
        bad = (~ok).to(torch.float32).reshape(1).to(self.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bad.item()

    def eval_step(self, batches: list):
        return self._run_schedule(batches, forward_only=True)

    @contextlib.contextmanager
    def evaluating(self):
        with self._params_gathered(), torch.no_grad():
            for chunk in self.built.chunks:
                chunk.eval()
            try:
                yield
            finally:
                for chunk in self.built.chunks:
                    chunk.train()

    def mean_loss(self, items: list) -> float:
        """The mean loss over the items, from the last pipeline stage's tp-rank-0 ranks: per token, per pair for DPO."""
        return self._loss(self._summed(items))

    def window_metrics(self, items: list) -> dict[str, float]:
        """DPO: the loss, the rewards of the chosen and the rejected, their margin and the accuracy (per pair)."""
        if not self.dpo:
            return {}
        from launch.train.dpo import stats_metrics

        return stats_metrics(self._summed(items).tolist())

    def _summed(self, items: list):
        total = torch.stack(items).sum(0).to(self.device)
        dist.all_reduce(total)
        return total

    def _loss(self, total) -> float:
        """The mean loss of summed reports: per token ([loss sum, tokens]), or per pair (DPO's ``pair_stats``)."""
        if self.dpo:
            from launch.train.megatron.dpo import loss_of

            return loss_of(total)
        return (total[0] / total[1].clamp(min=1)).item()

    @contextlib.contextmanager
    def _params_gathered(self):
        """With overlapped parameter all-gathers, finish them and pause the hooks (Megatron-LM's
        ``disable_forward_pre_hook`` around evaluation and saving)."""
        if not self.built.overlap_param_gather:
            yield
            return
        for chunk in self.built.chunks:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in self.built.chunks:
                chunk.enable_forward_pre_hook()

    # --- checkpoints ---------------------------------------------------------------------------

    def save_shards(self, directory: Path, client_state: dict) -> None:
        with self._params_gathered():
            self._state.save(self.built.chunks, self.built.optimizer, directory, client_state)

    def load(self, step_dir: Path, marker: dict, step: int) -> None:
        """Resume from ``step_dir``, saved with any layout if its optimizer is fully reshardable."""
        sharding = self._state.saved_sharding(step_dir)
        if sharding != self._state.OPTIMIZER_SHARDING and marker.get("layout") != self.layout():
            raise UserError(f"{step_dir} saved its optimizer {sharding}, which loads only into the layout it was "
                            f"saved with ({marker.get('layout')}); this run is {self.layout()}\n  fix: resume with "
                            "that layout")
        self._state.load(self.built.chunks, self.built.optimizer, step_dir, weights_only=False, sharding=sharding)
        self.built.scheduler.num_steps = 0  # a rewind in process (launch/train/guard.py): from step 0 again
        self.built.scheduler.step(increment=step)

    def init_from(self, source: InitSource) -> bool:
        """``stage.init_checkpoint``: the weights only, from a distributed checkpoint (any layout) or a Hugging
        Face model (each rank reads the tensors of its shards); the optimizer's main copies follow them."""
        if source.format is Format.hf:
            from launch.train.megatron import hf

            try:
                hf.load_hf([c.module for c in self.built.chunks], source.path, self._hf_config())
            except hf.MappingError as exc:
                raise UserError(f"stage.init_checkpoint={source.path}: {exc}\n  fix: a Llama or Mixtral model of "
                                f"model={self.cfg.model.name}'s shape") from None
        else:
            sharding = self._state.saved_sharding(source.path)
            self._state.load(self.built.chunks, self.built.optimizer, source.path, weights_only=True,
                             sharding=sharding)
        # bf16 runs keep fp32 main copies in the optimizer: refreshed from the loaded weights (Megatron-LM's
        # load_checkpoint does the same when it loads no optimizer state); a no-op for fp32 parameters.
        self.built.optimizer.reload_model_params()
        return True

    def export(self, directory: Path, last_step: Path) -> None:
        """``final/``: the last step's distributed checkpoint hard-linked into ``megatron/`` (rank 0), and the
        Hugging Face model converted from it (``hf.py``): each rank converts every world-th tensor, rank 0
        writes the index, ``config.json`` and the tokenizer's files."""
        if self.rank == 0:
            self._state.publish(last_step, directory / MEGATRON_SUBDIR)
        if self.no_hf:
            return
        from launch.train.megatron import hf

        config = self._hf_config()
        share = hf.export_share(last_step, directory, config, rank=self.rank, world=self.world)
        shares = [None] * self.world
        dist.all_gather_object(shares, share, group=self.stop_group)  # gloo: plain objects on the CPU
        if self.rank == 0:
            hf.finish_export(directory, config, {k: v for s in shares for k, v in s.items()},
                             self.cfg.data.tokenizer)

    def _hf_config(self):
        """The transformers config of this model (``launch.train.model.hf_config``), in its parameters' dtype."""
        from launch.train.data import eod_id
        from launch.train.model import hf_config

        config = hf_config(self.cfg, eod=eod_id(self.cfg.data.tokenizer)[1])
        config.dtype = getattr(torch, self.doc["objects"]["transformer_config"]["params_dtype"])
        return config

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            self.ps.destroy_model_parallel()
            dist.destroy_process_group()


def _loss_func(mask, fault, here, output):
    """Megatron's per-micro-batch loss: (sum over unmasked tokens, their count, what to report);
    ``fault``: a test-only fault on this step (``launch.train.guard.Faults``), NaN only where ``here``."""
    losses = output.float().reshape(-1)
    weights = mask.reshape(-1).float()
    loss = guard.apply_fault(torch.sum(losses * weights), fault, here=here)
    tokens = weights.sum().detach().to(torch.int)
    return loss, tokens, {"lm loss": torch.stack([loss.detach(), tokens.float()])}
