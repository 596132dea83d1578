"""The Megatron-Core trainer: ``python -m launch.train RUN_DIR`` on every rank, started by torchrun.

Reads what ``trainctl render`` wrote: ``config.yaml`` (the resolved config),
``megatron.yaml`` (one mapping of constructor arguments per megatron-core object,
built by ``launch.backends.megatron.resolve``) and ``plan.json`` (the estimate).
The step loop is the DeepSpeed trainer's (``launch.train.loop``: data position, logging, checkpoint cadence, stop
signals, resume); the machinery is megatron-core's own:

- ``parallel_state.initialize_model_parallel`` (tp, pp, vpp, cp, ep, expert tp);
  one ``GPTModel`` per virtual pipeline stage (TransformerEngine layers when the
  spec says so, megatron-core's local layers otherwise);
- weights: every parameter drawn from a generator seeded by its *global* name (the
  key and layer/expert offsets of its sharded-state-dict entry), then sliced to
  this rank's shard, so every layout starts from the same model (``init_by_name``);
- ``DistributedDataParallel`` (distributed optimizer, overlapped reduce/gather as
  the yaml says), ``get_megatron_optimizer``, ``OptimizerParamScheduler``, the
  schedule from ``get_forward_backward_func`` (interleaved 1F1B when vpp > 1) and
  ``finalize_model_grads`` for the data-parallel and embedding reductions;
- checkpoints with ``megatron.core.dist_checkpointing`` (``torch_dist``, the
  distributed optimizer saved ``fully_reshardable``): a step saved with one layout
  loads with another (tp, pp, vpp, dp may change on resume; the world size too).
  Committed like the DeepSpeed trainer's (``.tmp_`` directory, rename, ``latest``).

On a machine without a GPU, ``launch.train.cuda_on_cpu`` redirects megatron-core's
CUDA calls to the CPU (a test mode; real runs need GPUs).

The learning rate of optimizer step ``s`` (0-based) is ``OptimizerParamScheduler``'s
value after ``s + 1`` increments, so the first update already moves (Megatron-LM's
first update runs at ``init_lr`` = 0) and the warmup is ``launch.train.schedule``'s;
the cosine decay then runs one step ahead of it and reaches ``min_lr`` on the last step.

``stage=sft`` reads the chat JSONL sources through ``launch.train.chat`` (prompt-masked
samples of the same shape); ``stage.init_checkpoint`` loads weights only.

Exit codes: 0 done or stopped (checkpoint saved); 2 a user error found before
training; 3 not built (DPO/RLHF stages).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from functools import partial
from pathlib import Path

from launch.config.rampup import Rampup
from launch.train import checkpoint as ckpt
from launch.train import stop
from launch.train.loop import StepLoop
from launch.train.data import MissingData, check_data
from launch.train.metrics import Reporter, err

EXIT_USER = 2
EXIT_NOT_BUILT = 3

RESHARDABLE = (
    "parallel.tp", "parallel.pp", "parallel.vpp", "parallel.cp", "parallel.ep", "parallel.etp",
    "parallel.micro_batch_size", "parallel.sequence_parallel", "parallel.recompute", "parallel.zero_stage",
    "parallel.offload_optimizer", "parallel.offload_params", "parallel.allow_tp_across_nodes",
    "parallel.num_layers_in_first_pipeline_stage", "parallel.num_layers_in_last_pipeline_stage",
    "parallel.account_for_embedding_in_pipeline_split", "parallel.account_for_loss_in_pipeline_split",
    "cluster.nodes", "cluster.gpus_per_node",
)
"""Keys a resumed Megatron run may change besides ``checkpoint.RESUMABLE``: the layout. Distributed
checkpoints reshard across tp/pp/vpp/dp (and so the world size); the data order is global."""

OPTIMIZER_SHARDING = "fully_reshardable"  # dp_reshardable cannot change tp (DESIGN, "What is real here")


# --- before torch -----------------------------------------------------------------------------

def preflight(run_dir: Path, cfg, raw: dict) -> tuple[int, Path | None]:
    """Checks that need no torch: (exit code or 0, the step directory to resume from)."""
    kind = cfg.stage.kind.name
    if kind not in ("pretrain", "sft"):
        err(f"stage.kind={kind}: the Megatron-Core trainer trains pretrain and sft only so far")
        return EXIT_NOT_BUILT, None
    try:
        check_data(cfg)  # the prepared shards; for sft, the chat JSONL files
    except MissingData as exc:
        err(str(exc))
        return EXIT_USER, None
    init = init_checkpoint(cfg)
    if init and not Path(init, "metadata.json").is_file():
        err(f"stage.init_checkpoint={init}: no Megatron-Core distributed checkpoint there (metadata.json); "
            "it is the previous stage's {checkpoint_dir}/final, or one of its step directories")
        return EXIT_USER, None
    resume = ckpt.find_resume(ckpt.checkpoint_dir(cfg, run_dir))
    refusal = resume and ckpt.resume_refusal(resume, raw, also_resumable=RESHARDABLE)
    if refusal:
        err(refusal)
        return EXIT_USER, None
    return 0, resume


def init_checkpoint(cfg) -> str | None:
    """The distributed checkpoint whose weights start this run (``stage.init_checkpoint``), or None."""
    if cfg.stage.from_scratch:
        return None
    return cfg.stage.init_checkpoint or None


# --- deterministic initialisation ---------------------------------------------------------------

def _seed_of(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2 ** 63 - 1)


def _initial_value(key: str, shape, generator, device, config):
    """A full (unsharded) tensor for the parameter ``key``, as megatron-core initialises it.

    Norm weights 1, biases 0, the residual-branch outputs (``linear_proj``, ``linear_fc2``)
    N(0, std / sqrt(2 * layers)), every other matrix N(0, std) (TransformerConfig's
    ``init_method`` and ``output_layer_init_method``).
    """
    import torch

    leaf = key.rsplit(".", 1)[-1]
    if "norm" in key:
        return (torch.ones if "weight" in leaf else torch.zeros)(shape, device=device)
    if "bias" in leaf:
        return torch.zeros(shape, device=device)
    std = config.init_method_std
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std /= math.sqrt(2.0 * config.num_layers)
    return torch.randn(shape, generator=generator, device=device) * std


def init_by_name(chunks, *, seed: int, config, device) -> int:
    """Give every parameter the same values in every layout; the number of shards written.

    The model's sharded state dict names each local tensor by its global key, its
    layer (and expert) offset, and where its slice sits in the full tensor (gated
    MLPs' fc1 as two slices, tied output weights under the embedding's key): each is
    drawn whole from a generator seeded by (train.seed, global name) and sliced.
    """
    import torch
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    written = 0
    with torch.no_grad():
        for chunk in chunks:
            for item in nested_values(chunk.sharded_state_dict()):
                shards = nested_values(item.build()) if isinstance(item, ShardedTensorFactory) else [item]
                for sh in shards:
                    if not isinstance(sh, ShardedTensor):
                        continue  # _extra_state objects
                    p = sh.prepend_axis_num
                    name = sh.key + "".join(f"[{o}]" for o in sh.global_offset[:p])
                    full_shape = sh.global_shape[p:]
                    gen = torch.Generator(device=device).manual_seed(_seed_of(name, seed))
                    full = _initial_value(sh.key, full_shape, gen, device, config)
                    index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[p:], sh.data.shape))
                    sh.data.copy_(full[index].to(sh.data.dtype))
                    written += 1
    return written


# --- the trainer --------------------------------------------------------------------------------

class Trainer(StepLoop):
    def __init__(self, run_dir: Path, cfg, raw: dict, resume: Path | None):
        import torch
        import torch.distributed as dist

        from launch.backends import megatron as mb
        from launch.backends import save_interval
        from launch.config.derive import derive

        self.run_dir, self.cfg, self.raw = run_dir, cfg, raw
        self.ckpt_dir = ckpt.checkpoint_dir(cfg, run_dir)
        self.plan = json.loads((run_dir / "plan.json").read_text())
        self.doc = mb.load(run_dir / "megatron.yaml")
        self.d = derive(cfg)
        self.steps = self.d.steps
        self.save_every = save_interval(cfg, self.plan) or 0

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        else:
            from launch.train import cuda_on_cpu

            cuda_on_cpu.install()
        dist.init_process_group("nccl" if self.cuda else "gloo")
        self.device = torch.device("cuda") if self.cuda else torch.device("cpu")
        # Stop flags are CPU tensors: over gloo on GPU nodes too.
        self.stop_group = dist.new_group(backend="gloo") if self.cuda else None
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

        t = self.doc["training"]
        self.mbs, self.gbs, self.seq = int(t["micro_batch_size"]), int(t["global_batch_size"]), int(t["seq_length"])
        self.gas = int(t["num_microbatches"])
        self.full_gbs, self.full_gas = self.gbs, self.gas  # gbs and gas are smaller during a batch ramp-up
        self.ramp = Rampup.of(t.get("rampup_batch_size"))
        self._build(mb)

        self.report = Reporter(run_dir, cfg, self.plan, world=self.world, enabled=self.rank == 0)
        from launch.train.data import build_datasets

        valid_samples = int(cfg.train.eval_iters) * self.full_gbs
        self.data = build_datasets(cfg, train_samples=self.d.samples, valid_samples=valid_samples,
                                   cache_dir=run_dir / "data_cache")

        self.step, self.consumed = 0, 0
        if resume is not None:
            self._load(resume, weights_only=False)
        elif init_checkpoint(cfg):
            self._load(Path(init_checkpoint(cfg)), weights_only=True)

    def _build(self, mb) -> None:
        """Parallel state, model chunks, DDP, optimizer, scheduler, schedule: megatron-core's own objects."""
        import torch
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.models.gpt import GPTModel
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        from megatron.core.transformer import TransformerConfig

        ps.initialize_model_parallel(**mb.resolve(self.doc, "model_parallel"))
        seed = int(self.doc["training"]["seed"])
        model_parallel_cuda_manual_seed(seed)
        # megatron-core initialises, then init_by_name overwrites every value (the same weights in every
        # layout). Not perform_initialization=False: it also skips tagging the weights tensor-parallel, and
        # the optimizer's grad norm then counts only tp rank 0's shards (silently, a wrong clip).
        tc = TransformerConfig(**mb.resolve(self.doc, "transformer_config"))
        self.vpp = self.doc["model_parallel"]["virtual_pipeline_model_parallel_size"] or 1
        spec = mb.resolve(self.doc, "gpt_model")
        chunks = []
        for vp in range(self.vpp):
            vp_stage = vp if self.vpp > 1 else None
            chunks.append(GPTModel(
                tc, **spec, vp_stage=vp_stage,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)).to(self.device))
        self.n_params_local = sum(p.numel() for c in chunks for p in c.parameters()  # a tied output layer once
                                  if not (getattr(p, "shared_embedding", False) and not c.pre_process))
        init_by_name(chunks, seed=seed, config=tc, device=self.device)

        ddp_config = DistributedDataParallelConfig(**self.doc["ddp_config"])
        self.model = [DistributedDataParallel(config=tc, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
                      for i, c in enumerate(chunks)]
        self.optimizer = get_megatron_optimizer(OptimizerConfig(**mb.resolve(self.doc, "optimizer_config")),
                                                self.model)
        # Its steps are optimizer steps. Its state is not checkpointed: the run's length may change on
        # resume, so this run's values hold and a resume advances it to the step (_load).
        self.scheduler = OptimizerParamScheduler(self.optimizer, **self.doc["scheduler"])
        # Megatron-LM's wiring of the schedule (training.py: setup_model_and_optimizer, train).
        tc.finalize_model_grads_func = finalize_model_grads
        tc.grad_scale_func = self.optimizer.scale_loss
        one = (lambda fns: fns[0]) if len(self.model) == 1 else (lambda fns: fns)
        if ddp_config.overlap_grad_reduce:
            tc.no_sync_func = one([m.no_sync for m in self.model])
            tc.grad_sync_func = one([m.start_grad_sync for m in self.model])  # align_grad_reduce
        if ddp_config.overlap_param_gather and ddp_config.align_param_gather:
            tc.param_sync_func = one([m.start_param_sync for m in self.model])
        self.overlap_param_gather = ddp_config.overlap_param_gather
        self.fwd_bwd = get_forward_backward_func()
        self.ps = ps
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.last_stage_reporter = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        self.position_ids = torch.arange(self.seq, device=self.device).unsqueeze(0).expand(self.mbs, -1)

    # --- the loop ------------------------------------------------------------------------------

    def start_message(self) -> str:
        kind = "resuming" if self.step else "starting"
        mp = self.doc["model_parallel"]
        return (f"{kind} {self.cfg.name} at step {self.step}/{self.steps}: {self.n_params_total() / 1e6:.2f}M "
                f"parameters, {self.world} rank(s) = tp {mp['tensor_model_parallel_size']} x pp "
                f"{mp['pipeline_model_parallel_size']} (vpp {self.vpp}) x cp {mp['context_parallel_size']} x dp "
                f"{self.dp}; micro {self.mbs} x {self.gas} micro-batches x dp {self.dp} = {self.gbs} sequences of "
                f"{self.seq} tokens; checkpoint every {self.save_every or 'never'} step(s) to {self.ckpt_dir}")

    def set_batch(self, batch: int) -> None:
        """A batch ramp-up varies the micro-batches per step."""
        self.gbs, self.gas = batch, batch // (self.mbs * self.dp)

    def finish(self) -> str:
        final = self.publish_final()
        return (f"final checkpoint {self.ckpt_dir / ckpt.step_name(self.step)}, also as {final} "
                "(the next stage's stage.init_checkpoint)")

    def publish_final(self) -> Path:
        """``{checkpoint_dir}/final``: the last step's distributed checkpoint, hard-linked where the file
        system allows (no second copy of the bytes), out of reach of the retention of ``step_*``."""
        import torch.distributed as dist

        final = self.ckpt_dir / "final"
        if self.rank == 0:
            tmp = self.ckpt_dir / ".tmp_final"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.ckpt_dir / ckpt.step_name(self.step), tmp, copy_function=_link_or_copy)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        dist.barrier()
        return final

    def _batches(self, dataset, first_sample: int, count: int) -> list:
        """This data-parallel rank's ``count`` micro-batches of the global batch starting at ``first_sample``."""
        from launch.train.data import micro_batch

        return [tuple(t.to(self.device) for t in micro_batch(
            dataset, first_sample=first_sample, micro=m, micro_batch_size=self.mbs, dp_rank=self.dp_rank,
            dp=self.dp)) for m in range(count)]

    def _run_schedule(self, batches: list, forward_only: bool):
        """One pass of the pipeline schedule over ``batches``; [loss sum, tokens] on the reporting ranks."""
        import torch

        iterators = [iter(batches) for _ in self.model] if self.vpp > 1 else iter(batches)
        losses = self.fwd_bwd(forward_step_func=self._forward_step, data_iterator=iterators,
                              model=self.model if self.vpp > 1 else self.model[0], num_microbatches=len(batches),
                              seq_length=self.seq, micro_batch_size=self.mbs, decoder_seq_length=self.seq,
                              forward_only=forward_only)
        sums = torch.zeros(2, dtype=torch.float64)
        if self.last_stage_reporter:
            for item in losses:
                sums += item["lm loss"].detach().to("cpu", torch.float64)
        return sums

    def _forward_step(self, data_iterator, model):
        tokens, labels, mask = next(data_iterator)
        output = model(tokens, self.position_ids, None, labels=labels)
        return output, partial(_loss_func, mask)

    def train_step(self):
        """One optimizer step: (loss sums of this rank, the step's learning rate, the global grad norm)."""
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        sums = self._run_schedule(self._batches(self.data.train, self.consumed, self.gas), forward_only=False)
        self.scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"]
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise RuntimeError(f"step {self.step + 1}: the optimizer skipped the update (non-finite gradients)")
        return sums, lr, float(grad_norm) if grad_norm is not None else None

    def window_loss(self, sums: list) -> float:
        """Token-weighted mean loss over the window, from the last pipeline stage's tp-rank-0 ranks."""
        import torch
        import torch.distributed as dist

        total = torch.stack(sums).sum(0).to(self.device)
        dist.all_reduce(total)
        return (total[0] / total[1].clamp(min=1)).item()

    def evaluate(self) -> None:
        import torch

        iters = int(self.cfg.train.eval_iters)
        sums = []
        with self._params_gathered(), torch.no_grad():
            for chunk in self.model:
                chunk.eval()
            for it in range(iters):
                batches = self._batches(self.data.valid, it * self.full_gbs, self.full_gas)  # full batches: comparable
                sums.append(self._run_schedule(batches, forward_only=True))
            for chunk in self.model:
                chunk.train()
        self.report.eval(step=self.step, loss=self.window_loss(sums), iters=iters)

    @contextlib.contextmanager
    def _params_gathered(self):
        """With overlapped parameter all-gathers, finish them and pause the hooks (Megatron-LM's
        ``disable_forward_pre_hook`` around evaluation and saving)."""
        if not self.overlap_param_gather:
            yield
            return
        for chunk in self.model:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in self.model:
                chunk.enable_forward_pre_hook()

    def layout(self) -> dict:
        mp = self.doc["model_parallel"]
        return {"tp": mp["tensor_model_parallel_size"], "pp": mp["pipeline_model_parallel_size"], "vpp": self.vpp,
                "dp": self.dp}

    def n_params_total(self) -> int:
        import torch
        import torch.distributed as dist

        # Parameters counted once: every rank's local count over the tp x pp x ep ranks of one dp replica.
        n = torch.tensor([self.n_params_local if self.dp_rank == 0 else 0], dtype=torch.float64, device=self.device)
        dist.all_reduce(n)
        return int(n.item())

    # --- checkpoints ---------------------------------------------------------------------------

    def _sharded_state_dict(self, *, loading: bool, with_optimizer: bool = True,
                            sharding: str = OPTIMIZER_SHARDING) -> dict:
        metadata = {"distrib_optim_sharding_type": sharding, "singleton_local_shards": False,
                    "chained_optim_avoid_prefix": True,
                    "dp_cp_group": self.ps.get_data_parallel_group(with_context_parallel=True)}
        # The GPTModels, not their DDP wrappers (whose keys gain a "module." prefix): Megatron-LM's keys.
        state = {f"model{i}": chunk.module.sharded_state_dict(metadata=metadata)
                 for i, chunk in enumerate(self.model)}
        if with_optimizer:
            state["optimizer"] = self.optimizer.sharded_state_dict(state, is_loading=loading, metadata=metadata)
        return state

    def save(self) -> Path:
        import torch
        import torch.distributed as dist
        from megatron.core import dist_checkpointing

        tmp_tag = f".tmp_{ckpt.step_name(self.step)}"
        tmp = self.ckpt_dir / tmp_tag
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a save of this step that a kill interrupted
            tmp.mkdir()
        dist.barrier()
        t0 = time.perf_counter()
        with self._params_gathered():
            state = self._sharded_state_dict(loading=False)
            state["trainctl"] = {"step": self.step, "consumed_samples": self.consumed}
            dist_checkpointing.save(state, str(tmp),
                                    content_metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING})
        torch.save(ckpt.rng_state(), tmp / f"rng_rank{self.rank}.pt")
        dist.barrier()
        final = self.ckpt_dir / ckpt.step_name(self.step)
        if self.rank == 0:
            ckpt.commit(self.ckpt_dir, tmp_tag, self.step, {
                "step": self.step, "consumed_samples": self.consumed, "world_size": self.world,
                "layout": self.layout(), "config": self.raw, "time": time.time()})
            self.report.event(f"checkpoint {final} ({time.perf_counter() - t0:.1f} s)")
        dist.barrier()
        return final

    def _load(self, step_dir: Path, *, weights_only: bool) -> None:
        """Resume from ``step_dir`` (any layout), or take only its weights (``stage.init_checkpoint``)."""
        import torch
        from megatron.core import dist_checkpointing

        # How its distributed-optimizer state was saved (ours: fully_reshardable; Megatron-LM's may differ).
        content = dist_checkpointing.load_content_metadata(str(step_dir)) or {}
        sharding = content.get("distrib_optim_sharding_type", OPTIMIZER_SHARDING)
        marker = ckpt.read_marker(step_dir) if ckpt.is_complete(step_dir) else {}
        if not weights_only and sharding != OPTIMIZER_SHARDING and marker.get("layout") != self.layout():
            raise SystemExit(f"trainctl: {step_dir} saved its optimizer {sharding}, which loads only into the "
                             f"layout it was saved with ({marker.get('layout')}); this run is {self.layout()}")
        if not weights_only:
            _create_adam_state(self.optimizer)
        state = self._sharded_state_dict(loading=True, with_optimizer=not weights_only, sharding=sharding)
        loaded = dist_checkpointing.load(state, str(step_dir))
        for i, chunk in enumerate(self.model):
            chunk.module.load_state_dict(loaded[f"model{i}"], strict=True)
        if weights_only:
            self.report.event(f"initialised from {step_dir} (weights only)")
            return
        with _torch_adam_step_kept(self.optimizer):
            self.optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(self.optimizer)
        self.step, self.consumed = int(marker["step"]), int(marker["consumed_samples"])
        self.scheduler.step(increment=self.step)
        rng = step_dir / f"rng_rank{self.rank}.pt"
        if marker.get("layout") == self.layout() and rng.is_file():  # rank r is the same rank only then
            ckpt.set_rng_state(torch.load(rng, weights_only=False))
        self.report.event(f"resumed from {step_dir}: step {self.step}, {self.consumed} samples consumed "
                          f"(saved with layout {marker.get('layout')})")
        self.report.rewind(self.step)

    def close(self) -> None:
        import torch.distributed as dist

        self.report.close()
        if dist.is_initialized():
            dist.barrier()
            self.ps.destroy_model_parallel()
            dist.destroy_process_group()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _loss_func(mask, output):
    """Megatron's per-micro-batch loss: (sum over unmasked tokens, their count, what to report)."""
    import torch

    losses = output.float().reshape(-1)
    weights = mask.reshape(-1).float()
    loss = torch.sum(losses * weights)
    tokens = weights.sum().detach().to(torch.int)
    return loss, tokens, {"lm loss": torch.stack([loss.detach(), tokens.float()])}


def _create_adam_state(optimizer) -> None:
    """A fresh optimizer has no Adam state for a checkpoint to load into (DESIGN trap): create it.

    megatron-core's own routine: one step with zero gradients. It leaves the weights as they
    are (a zero Adam update; the decay is scaled by the scheduler's rate before step 1, 0) and
    everything it creates is overwritten by the load.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if len(opt.optimizer.state) == 0:
            if hasattr(opt, "_init_optimizer_states_with_dummy_values"):  # DistributedOptimizer
                opt._init_optimizer_states_with_dummy_values()
            elif opt.init_state_fn is not None:
                opt.init_state_fn(opt.optimizer, opt.config)


@contextlib.contextmanager
def _torch_adam_step_kept(optimizer):
    """Work around megatron-core 0.16.1 loading a ``fully_reshardable`` state into torch's Adam.

    Without TransformerEngine or Apex its DistributedOptimizer uses torch.optim.AdamW, whose
    per-parameter state holds ``step``; ``load_parameter_state_from_fully_reshardable`` hands
    over every state tensor but ``step`` (restored apart, from the param groups) and the copy
    then fails on the missing key. Here each copy leaves ``step`` aside and puts back a tensor of
    the parameter's own (the loaded one is shared by all parameters: DESIGN trap).
    """
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None or opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            continue

        def set_states(model_param, tensors, _opt=opt, _setter=setter):
            group, order = _opt.model_param_group_index_map[model_param]
            state = _opt.optimizer.state[_opt.optimizer.param_groups[group]["params"][order]]
            step = state.pop("step", None) if "step" not in tensors else None
            try:
                _setter(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step.clone()

        opt._set_main_param_and_optimizer_states = set_states
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # the class's method again


def _unshare_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam ``step`` tensor (DESIGN trap: a loaded, shared one advances per param)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if "step" in state and hasattr(state["step"], "clone"):
                state["step"] = state["step"].clone()


def main(run_dir: Path) -> int:
    cfg, raw = ckpt.load_config(run_dir)
    code, resume = preflight(run_dir, cfg, raw)
    if code:
        return code
    stop.install()
    # Notices megatron-core 0.16 and torch 2.13 print on every rank, some once per call.
    for message in (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                    r"full scope is deprecated", r"`torch\.distributed\.\w+` is deprecated",
                    r"`load_state_dict` is deprecated", r"Please use DTensor instead"):
        warnings.filterwarnings("ignore", message=message)
    trainer = Trainer(run_dir, cfg, raw, resume)
    try:
        return trainer.train()
    finally:
        trainer.close()
