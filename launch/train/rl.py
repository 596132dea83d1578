"""The RL stage (``stage=rlhf``: GRPO or RLOO) on the DeepSpeed backend: TRL's trainer owns the loop.

``RLTrainer`` has the face ``launch.train.__main__`` expects of the skeleton's ``Trainer``
(``resume``, ``init_from``, ``train``, ``close``, ``step``, ``steps``), but the loop is TRL
1.16's ``GRPOTrainer`` or ``RLOOTrainer`` (generation, rewards, group advantages, the
clipped policy loss, the KL term to a frozen reference): too much to rewrite, and TRL is
the well-kept implementation. It runs on accelerate with DeepSpeed, handed the rendered
``ds_config.json`` (the ZeRO section as translated by ``launch.backends.deepspeed``).
Hugging Face's integration checks that file against the trainer's arguments, so those are
read from it (batch, optimizer, clipping, precision); the file's ``scheduler`` section is
dropped and Hugging Face's own schedule built from ``optim.*`` (cosine to ``optim.min_lr``,
or warmup-stable-decay): DeepSpeed's ``WarmupCosineLR`` has no minimum the integration maps.

Batch: ``train.global_batch_size`` counts *completions* per optimizer step (TRL's
generation batch), ``stage.num_generations`` of them per prompt, so a step sees
``global_batch_size / num_generations`` prompts; ``parallel.micro_batch_size`` is TRL's
``per_device_train_batch_size``.

What trainctl wires in through a ``TrainerCallback`` (``_Hooks``), every rank:

- **Stop signals**: after every optimizer step the ranks agree on a stop flag
  (``launch.train.stop``); on SIGUSR1/SIGTERM they save and stop, and ``__main__``
  records ``stopped`` (USR1: the job script requeues; the next job resumes).
- **Checkpoints** in trainctl's commit protocol (``launch.record.checkpoints``):
  Hugging Face writes its checkpoint (DeepSpeed's shards of every rank, optimizer,
  scheduler, ``trainer_state.json``, its RNG files) into ``.tmp_hf/checkpoint-N``
  under ``train.checkpoint_dir``; then every rank adds its ``rng_rank{R}.pt``,
  rank 0 renames the directory ``.tmp_step_N``, all ranks checksum it, rank 0
  writes the marker with its manifest, renames it ``step_N``, moves ``latest`` and
  prunes. A checkpoint every ``train.checkpoint_interval`` steps (else the plan's),
  and at the last step. Resume verifies candidates as the skeleton does and hands
  the step directory to ``Trainer.train(resume_from_checkpoint=...)``: Hugging Face
  restores the DeepSpeed state, the schedule, the RNG and the data position (it
  skips the batches already seen). With the rendered config's
  ``stage3_gather_16bit_weights_on_model_save`` each checkpoint also holds the
  consolidated ``model.safetensors`` (a gather to rank 0 per save); with it false,
  Hugging Face writes DeepSpeed's state twice per checkpoint instead (``save_model``,
  then the optimizer's save): costs of reusing its checkpoint code.
- **Watchdog beats** after each step and at each save; **metrics.jsonl** (and
  wandb) through ``launch.train.metrics.Reporter`` from TRL's logs: loss, learning
  rate, grad norm, step time, and the RL figures (mean reward and its spread, each
  reward's mean, KL, entropy, completion length) as extra fields.
- **Non-finite weights** are refused before a checkpoint is committed and before the
  export (``Diverged``, the ``diverged`` outcome). TRL has no skip budget or loss-spike
  rewind: those rows of the fault table do not hold for RL stages (README).

``final/`` is the consolidated Hugging Face model and its tokenizer, as the DeepSpeed
trainer's export (marker, then a rename).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from launch.config.schema import BackendName, Precision, Recompute, RlAlgorithm, Schedule
from launch.errors import UserError
from launch.record import checkpoints as ckpt
from launch.record import fingerprint, manifest
from launch.record.read import RECORD_VERSION, PlanNumbers, RunConfig, read_backend_file
from launch.train import stop, trust, watchdog
from launch.train.guard import Diverged
from launch.train.metrics import Reporter
from launch.train.preflight import ENGINES, cpu_devices, resolve_init
from launch.train.rewards import resolve
from launch.train.rollout import trl_vllm_args

HF_STAGING = ".tmp_hf"
"""Where Hugging Face writes a checkpoint before trainctl commits it (under train.checkpoint_dir)."""
RL_FIELDS = {"reward": "reward", "reward_std": "reward_std", "kl": "kl", "entropy": "entropy",
             "completion_length": "completions/mean_length", "clipped_ratio": "completions/clipped_ratio",
             "frac_reward_zero_std": "frac_reward_zero_std"}
"""metrics.jsonl field -> TRL's log key."""


def rollout_args(cfg) -> dict:
    """The generation keys of GRPOConfig/RLOOConfig: the one place vLLM's are merged in.

    ``stage.rollout.engine=hf``: transformers' ``generate`` inside the training ranks (TRL ``use_vllm=False``).
    vLLM (colocate or server): ``launch.train.rollout.trl_vllm_args(cfg)`` gives TRL's ``use_vllm``,
    ``vllm_mode`` and the server's or colocated engine's keys.
    """
    return trl_vllm_args(cfg, os.environ)


def ds_config_for_trl(ds: dict) -> dict:
    """The rendered DeepSpeed config as Hugging Face's integration takes it: its schedule is Hugging Face's
    (``trl_args``), so DeepSpeed's ``scheduler`` section goes."""
    return {k: v for k, v in ds.items() if k != "scheduler"}


def trl_args(cfg, ds: dict, *, steps: int, output_dir: Path) -> dict:
    """GRPOConfig/RLOOConfig keyword arguments: the ones Hugging Face checks against ``ds`` read from it."""
    s, o, t = cfg.stage, cfg.optim, cfg.train
    opt = ds.get("optimizer", {}).get("params", {})
    betas = opt.get("betas", [o.beta1, o.beta2])
    if o.schedule is Schedule.wsd:
        from launch.backends.common import wsd_decay_steps

        schedule = {"lr_scheduler_type": "warmup_stable_decay",
                    "lr_scheduler_kwargs": {"num_decay_steps": int(wsd_decay_steps(cfg, steps)),
                                            "min_lr_ratio": o.min_lr / float(opt["lr"])}}
    else:
        schedule = {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": o.min_lr}}
    kwargs = dict(
        output_dir=str(output_dir), max_steps=steps, seed=int(t.seed), data_seed=int(t.seed),
        per_device_train_batch_size=int(ds["train_micro_batch_size_per_gpu"]),
        gradient_accumulation_steps=int(ds["gradient_accumulation_steps"]),
        learning_rate=float(opt["lr"]), adam_beta1=float(betas[0]), adam_beta2=float(betas[1]),
        adam_epsilon=float(opt.get("eps", o.eps)), weight_decay=float(opt.get("weight_decay", o.weight_decay)),
        max_grad_norm=float(ds.get("gradient_clipping", o.clip_grad)), warmup_steps=int(o.warmup_steps), **schedule,
        bf16=bool(ds.get("bf16", {}).get("enabled", False)), fp16=False,
        gradient_checkpointing=cfg.parallel.recompute is Recompute.full,
        deepspeed=ds_config_for_trl(ds), use_cpu=cpu_devices(cfg),
        logging_steps=max(1, int(t.log_interval)), save_strategy="no", save_total_limit=None,
        report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32" if t.precision is Precision.fp32 else "bfloat16"},
        num_generations=int(s.num_generations), max_completion_length=int(s.max_completion_length),
        temperature=float(s.temperature), beta=float(s.kl_coef), epsilon=float(s.clip_eps),
    )
    kwargs.update(rollout_args(cfg))
    return kwargs


class RLTrainer:
    def __init__(self, run_dir: Path, record: RunConfig, plan: PlanNumbers):
        if record.cfg.stage.rl_algorithm is RlAlgorithm.ppo:  # validation refuses it; a hand-edited record too
            raise UserError("stage.rl_algorithm=ppo: TRL 1.16 has no PPO trainer\n  fix: stage.rl_algorithm=grpo")
        cfg = self.cfg = record.cfg
        self.run_dir, self.raw = run_dir, record.raw
        self.ckpt_dir = ckpt.checkpoint_dir(cfg, run_dir)
        self.steps = record.derived.steps
        self.save_every = plan.save_interval(cfg.train.checkpoint_interval) or 0
        self.gbs = cfg.train.global_batch_size
        self.prompts_per_step = self.gbs // cfg.stage.num_generations
        self.resume_from: Path | None = None
        self._step = 0
        self.ds = read_backend_file(run_dir, "ds_config.json")
        trl_cls, config_cls = _trl_classes(cfg)
        fresh = None if _init_model(cfg) else _random_model(cfg)  # before the DeepSpeed config is global:
        # Hugging Face would build it under zero.Init, partitioned, and it is saved whole below
        args = config_cls(**trl_args(cfg, self.ds, steps=self.steps, output_dir=self.ckpt_dir / HF_STAGING))
        _ = args.device  # accelerate's state: the process group exists from here
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if cpu_devices(cfg) else "nccl")  # its comm layer too:
        # zero.Init (Hugging Face's ZeRO-3 loading) asks it for the world size, 1 when it is not set up
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.report = Reporter(run_dir, cfg, plan, world=self.world, enabled=self.rank == 0)
        self.tokenizer = _tokenizer(cfg)
        model = _init_model(cfg) or self._save_random_init(fresh)
        rewards = [resolve(str(name)) for name in cfg.stage.rewards]
        if cfg.stage.reward_model:
            rewards.append(str(Path(cfg.stage.reward_model).expanduser()))  # TRL loads it (sequence classification)
        self.hooks = _Hooks(self)
        self.trl = trl_cls(model=model, reward_funcs=rewards, args=args, train_dataset=_prompts(cfg, run_dir),
                           processing_class=self.tokenizer, callbacks=[self.hooks])
        from transformers.trainer_callback import PrinterCallback

        self.trl.remove_callback(PrinterCallback)  # its dict per log: the Reporter prints one line instead
        self.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.trl.model.parameters())

    @property
    def step(self) -> int:
        return self._step

    # --- the run -------------------------------------------------------------------------------

    def train(self) -> int:
        cfg = self.cfg
        kind = "resuming" if self.resume_from else "starting"
        self.report.event(
            f"{kind} {cfg.name} ({cfg.stage.rl_algorithm.name.upper()}, TRL {_trl_version()}) at step {self._step}/"
            f"{self.steps}: {self.n_params / 1e6:.2f}M parameters, {self.world} rank(s), ZeRO "
            f"{self.ds.get('zero_optimization', {}).get('stage', 0)}; {self.prompts_per_step} prompts x "
            f"{cfg.stage.num_generations} completions of <= {cfg.stage.max_completion_length} tokens per step, rewards "
            f"{', '.join(map(str, cfg.stage.rewards)) or '-'}{'; reward model ' + cfg.stage.reward_model if cfg.stage.reward_model else ''}; "
            f"checkpoint every {self.save_every or 'never'} step(s) to {self.ckpt_dir}")
        if not self.resume_from:
            self.report.rewind(0)
        watchdog.beat(self._step, phase="training")
        self.trl.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)
        self._step = int(self.trl.state.global_step)
        if self.hooks.stopping and self._step < self.steps:  # a stop at the last step still exports
            why = stop.requested() or "a stop signal on another rank"
            self.report.event(f"stopped by {why} at step {self._step}, checkpoint saved")
            return 0
        if not cfg.train.save_final:
            self.report.event(f"done: {self._step} steps; nothing saved (train.save_final=false)")
            return 0
        final = self.export()
        self.report.event(f"done: {self._step} steps; final checkpoint {self.ckpt_dir / ckpt.step_name(self._step)}, "
                          f"Hugging Face model {final} (the next stage's stage.init_checkpoint)")
        return 0

    def init_from(self, source) -> None:
        """Nothing to load: TRL built the policy (and its reference) from ``stage.init_checkpoint``. Recorded
        with the fingerprint of the weights the policy holds (``launch.record.fingerprint``; ZeRO-3 partitions
        are gathered one tensor at a time, on every rank)."""
        import deepspeed

        def gathered(param):
            return deepspeed.zero.GatheredParameters([param]) if hasattr(param, "ds_id") else contextlib.nullcontext()

        weights = fingerprint.of_model(dict(self.trl.model.named_parameters()), source.path, gathered)
        self.report.event(f"initialised from {source.path} (policy and reference){source.note and ': ' + source.note}")
        self.report.record("init", step=0, path=str(source.path), format=source.format.value, weights_sha256=weights)

    def resume(self, step_dir: Path) -> None:
        """The newest checkpoint that verifies (checksums across the ranks), as the skeleton's resume; Hugging
        Face loads it when training starts."""
        skipped = []
        for candidate in ckpt.candidates(self.ckpt_dir):
            found, problem = trust.verify(candidate, self.rank, self.world, {"world": self.world})
            if problem:
                skipped.append((candidate, problem))
                self.report.event(ckpt.skip_line(candidate, problem))
                continue
            if candidate != step_dir:
                refusal = ckpt.resume_refusal(candidate, self.raw, self.cfg.backend.name)
                if refusal:
                    raise UserError(refusal)
            marker = found.marker
            if marker.get("world_size") not in (None, self.world):
                raise UserError(f"{candidate} was saved by {marker['world_size']} ranks, this job has {self.world}: "
                                "ZeRO shards reload only on the same number\n  fix: resume with the cluster.nodes "
                                "and cluster.gpus_per_node it was saved with")
            self.resume_from, self._step = candidate, int(marker["step"])
            self.report.event(f"resumed from {candidate}: step {self._step}, {marker['consumed_samples']} prompts "
                              f"consumed; verified {len(marker['manifest']['files'])} files")
            self.report.rewind(self._step)
            return
        raise ckpt.none_verifies(self.ckpt_dir, skipped)

    # --- checkpoints (called by _Hooks.on_save, every rank) ------------------------------------

    def commit(self, step: int) -> Path:
        """Hugging Face's ``checkpoint-N`` -> ``.tmp_step_N`` -> checksummed, marked -> ``step_N``, ``latest``."""
        watchdog.beat(phase="checkpoint save")
        hf = self.ckpt_dir / HF_STAGING / f"checkpoint-{step}"
        tmp, final = self.ckpt_dir / f".tmp_{ckpt.step_name(step)}", self.ckpt_dir / ckpt.step_name(step)
        t0 = time.perf_counter()
        self._refuse_non_finite(step, "checkpoint", hf)
        from launch.train.loop import rng_state

        failure = trust.agree(trust.storage_error(torch.save, rng_state(), hf / f"rng_rank{self.rank}.pt"))
        dist.barrier()
        if failure is None:
            failure = trust.agree(trust.storage_error(_stage, hf, tmp) if self.rank == 0 else None)
        if failure is None:
            sizes, sums = trust.file_checksums(tmp, self.rank, self.world)
            consumed = step * self.prompts_per_step
            if self.rank == 0:
                failure = trust.storage_error(ckpt.commit, self.ckpt_dir, tmp.name, step, {
                    "step": step, "consumed_samples": consumed, "world_size": self.world,
                    "layout": {"world": self.world}, "config": self.raw, "record_version": RECORD_VERSION,
                    "time": time.time(), "engine": "trl",
                    "manifest": manifest.build(sizes, sums, step=step, config=self.raw,
                                               rng_ranks=list(range(self.world)), consumed_samples=consumed)},
                    self.cfg.train.keep_checkpoints)
            failure = trust.agree(failure)
        if failure:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.rmtree(hf, ignore_errors=True)
            dist.barrier()
            raise ckpt.StorageFull(ckpt.storage_line(self.ckpt_dir, step, failure, _latest(self.ckpt_dir)))
        self.report.event(f"checkpoint {final} ({time.perf_counter() - t0:.1f} s, {len(sizes)} files, "
                          f"{sum(sizes.values()) / 1e6:.1f} MB checksummed)")
        dist.barrier()
        watchdog.beat(step, phase="training")
        return final

    def _refuse_non_finite(self, step: int, what: str, written: Path | None = None) -> None:
        engine = self.trl.model_wrapped
        ok = torch.stack([torch.isfinite(getattr(p, "ds_tensor", p).data).all() for p in engine.parameters()]).all()
        bad = (~ok).to(torch.float32).reshape(1).to(self.trl.accelerator.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            if written is not None and self.rank == 0:
                shutil.rmtree(written, ignore_errors=True)
            raise Diverged(f"step {step}: a parameter is not finite; no {what} written", step)

    def export(self) -> Path:
        """``{checkpoint_dir}/final``: the consolidated Hugging Face model and tokenizer, marked, renamed."""
        watchdog.beat(phase="final export")
        final, tmp = self.ckpt_dir / "final", self.ckpt_dir / ".tmp_final"
        self._refuse_non_finite(self._step, "final export")
        engine = self.trl.model_wrapped
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        if engine.zero_optimization_partition_weights():
            state = engine._zero3_consolidated_16bit_state_dict()  # compat.DEEPSPEED_ZERO3_GATHER, every rank
        else:
            state = engine.module.state_dict() if self.rank == 0 else None
        if self.rank == 0:
            model = self.trl.accelerator.unwrap_model(engine)
            model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(str(tmp))
            ckpt.publish_final(tmp, final, {"step": self._step, "config": self.raw,
                                             "record_version": RECORD_VERSION, "time": time.time()})
        dist.barrier()
        return final

    def _save_random_init(self, model) -> str:
        """``stage.from_scratch``: the random model (``_random_model``), saved by rank 0 as a Hugging Face
        directory under RUN_DIR that TRL loads as policy and reference alike."""
        path = self.run_dir / "rl_init"
        if self.rank == 0:
            tmp = self.run_dir / ".tmp_rl_init"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp), safe_serialization=True)
            self.tokenizer.save_pretrained(str(tmp))
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        dist.barrier()
        return str(path)

    def close(self) -> None:
        self.report.close()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class _Hooks(TrainerCallback):
    """trainctl's side of TRL's loop: stop agreement, save cadence, commit, beats, metrics."""

    def __init__(self, owner: RLTrainer):
        self.owner = owner
        self.stopping = False
        self._tokens = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        o, step = self.owner, int(state.global_step)
        o._step = step
        watchdog.beat(step)
        if _agree_stop(o.trl.accelerator.device):
            self.stopping = True
            control.should_save = True
            control.should_training_stop = True
        if (o.save_every and step % o.save_every == 0) or (step >= o.steps and o.cfg.train.save_final):
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.owner.commit(int(state.global_step))
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        o = self.owner
        if not logs or "loss" not in logs or o.rank != 0:
            return control
        step = int(state.global_step)
        tokens = float(logs.get("num_tokens", self._tokens))
        window = max(1, int(args.logging_steps))
        step_tokens, self._tokens = (tokens - self._tokens) / window, tokens
        counters = {k: logs[v] for k, v in RL_FIELDS.items() if v in logs}
        counters.update({f"reward_{key.split('/')[1]}": v for key, v in logs.items()
                         if key.startswith("rewards/") and key.endswith("/mean")})
        o.report.train_step(step=step, loss=float(logs["loss"]), lr=float(logs.get("learning_rate", 0.0)),
                            grad_norm=_float(logs.get("grad_norm")), steps=o.steps,
                            step_time_s=float(logs.get("step_time", 0.0)), tokens=int(step_tokens),
                            consumed_samples=step * o.prompts_per_step, global_batch_size=o.gbs, counters=counters)
        if "reward" in counters:
            each = ", ".join(f"{k[7:]} {v:.3f}" for k, v in counters.items() if k.startswith("reward_") and k != "reward_std")
            o.report.event(f"step {step}: reward {counters['reward']:.4f} (std {counters.get('reward_std', 0.0):.4f}; "
                           f"{each})" + (f", kl {counters['kl']:.4f}" if "kl" in counters else ""))
        return control


def _agree_stop(device) -> bool:
    """``launch.train.stop.agree`` on the training device (NCCL reduces no CPU tensor): any rank's stop, on all."""
    flag = torch.tensor([1.0 if stop.requested() else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _stage(hf: Path, tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)  # a save of this step that a kill interrupted
    os.replace(hf, tmp)
    shutil.rmtree(hf.parent, ignore_errors=True)  # the staging directory (TRL's model card): made again at a save


def _float(value) -> float | None:
    return float(value) if value is not None else None


def _latest(checkpoint_dir: Path) -> Path | None:
    try:
        return ckpt.find_resume(checkpoint_dir)
    except UserError:
        return None


def _random_model(cfg):
    """The model of ``model.*`` with random weights (seed ``train.seed``: the same on every rank)."""
    from transformers import AutoModelForCausalLM

    from launch.train.data_common import eod_id
    from launch.train.model import hf_config

    torch.manual_seed(int(cfg.train.seed))
    config = hf_config(cfg, eod=eod_id(cfg.data.tokenizer)[1])
    config.use_cache = True  # generation
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _trl_classes(cfg):
    if cfg.stage.rl_algorithm is RlAlgorithm.rloo:
        from trl import RLOOConfig, RLOOTrainer

        return RLOOTrainer, RLOOConfig
    from trl import GRPOConfig, GRPOTrainer

    return GRPOTrainer, GRPOConfig


def _trl_version() -> str:
    import trl

    return trl.__version__


def _tokenizer(cfg):
    """The init checkpoint's tokenizer (an export carries it), else ``data.tokenizer``'s tokenizer.json with
    its end-of-document token as EOS (and ``<|pad|>`` as padding where it has one)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    init = _init_model(cfg)
    if init and Path(init, "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(init, local_files_only=True)
    else:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(cfg.data.tokenizer).expanduser()))
    if tok.eos_token is None:  # TRL ends a completion at EOS: the end-of-document token prepare found
        from launch.train.data_common import eod_id

        tok.eos_token = tok.convert_ids_to_tokens(eod_id(cfg.data.tokenizer)[1])
    if tok.pad_token is None:
        tok.pad_token = "<|pad|>" if "<|pad|>" in tok.get_vocab() else tok.eos_token
    tok.padding_side = "left"
    return tok


def _prompts(cfg, run_dir: Path):
    """The prompt data: each source's JSONL through HF datasets (local files, cache under RUN_DIR), its
    ``text_key`` field as ``prompt``, other fields (``answer``) kept for the rewards; several sources are
    interleaved by weight (seed ``train.seed``). ``data.split`` is not applied: every row is a training prompt
    (RL stages run no validation pass; ``train.eval_interval`` is not read)."""
    from datasets import interleave_datasets, load_dataset

    parts, weights = [], []
    for name, source in cfg.data.sources.items():
        part = load_dataset("json", data_files={"train": str(Path(source.path).expanduser())}, split="train",
                            cache_dir=str(run_dir / "data_cache"))
        if source.text_key != "prompt":
            if "prompt" in part.column_names:
                part = part.remove_columns("prompt")
            part = part.rename_column(source.text_key, "prompt")
        parts.append(part)
        weights.append(float(source.weight))
    if len(parts) == 1:
        return parts[0]
    total = sum(weights)
    return interleave_datasets(parts, probabilities=[w / total for w in weights], seed=int(cfg.train.seed),
                               stopping_strategy="all_exhausted")


def _init_model(cfg) -> str | None:
    """The Hugging Face model directory ``stage.init_checkpoint`` leads to (a run directory, its
    checkpoints, ``final/``: ``launch.train.preflight.resolve_init``, what preflight checked), or None."""
    source = resolve_init(cfg, ENGINES[BackendName.deepspeed])
    return str(source.path) if source else None
