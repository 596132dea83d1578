"""What a training job checks before it builds anything: engine, stage, data, devices, checkpoint directory,
resume.

All but ``device_problem`` run without torch: a bad input stops the job in a second
with one line and a distinct exit code. ``ENGINES`` names each backend's
``TrainModule`` and what differs between engines before training.
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from launch.config.schema import BackendName, Config, StageKind
from launch.config.stages import trains
from launch.errors import UserError
from launch.record.read import RunConfig
from launch.record import checkpoints as ckpt
from launch.train import init_source
from launch.train.data import MissingData, check_data
from launch.train.init_source import Format, InitSource

EXIT_USER = 2
"""A user error found on the node (missing data, a changed config on resume, a damaged record, a checkpoint
directory that cannot be written, checkpoints of which none verifies)."""
EXIT_NOT_BUILT = 3
"""The stage or setting has no trainer yet."""
EXIT_NO_DEVICE = 4
"""A GPU profile on a node where torch sees no GPU."""
EXIT_STORAGE = 7
"""A checkpoint save ran out of space or quota (``launch.record.checkpoints.StorageFull``)."""


@dataclass(frozen=True)
class Engine:
    module: str
    """``module:Class`` of its ``TrainModule``."""
    name: str
    init_formats: tuple[Format, ...]
    """What it loads as ``stage.init_checkpoint``, preferred first (``launch.train.init_source``)."""
    unsupported: Callable[[Config], str | None] = lambda cfg: None
    stage_modules: dict[StageKind, str] = field(default_factory=dict)
    """``module:Class`` for a stage whose objective differs (DPO), else ``module``."""

    def build(self, run_dir: Path, record: RunConfig, plan):
        module, cls = self.stage_modules.get(record.cfg.stage.kind, self.module).split(":")
        return getattr(importlib.import_module(module), cls)(run_dir, record, plan)


def _deepspeed_unsupported(cfg: Config) -> str | None:
    if cfg.parallel.cp > 1:
        return (f"parallel.cp={cfg.parallel.cp}: Ulysses sequence parallelism is not wired into the DeepSpeed "
                "trainer yet; use parallel.cp=1")
    return None


ENGINES = {
    BackendName.deepspeed: Engine("launch.train.deepspeed_trainer:DeepSpeedModule", "DeepSpeed", (Format.hf,),
                                  unsupported=_deepspeed_unsupported,
                                  stage_modules={StageKind.dpo: "launch.train.deepspeed_dpo:DpoDeepSpeedModule"}),
    BackendName.megatron: Engine("launch.train.megatron.module:MegatronModule", "Megatron-Core",
                                 (Format.megatron, Format.hf)),
}


def init_checkpoint(cfg: Config) -> str | None:
    """The checkpoint whose weights start this run (``stage.init_checkpoint``), or None (from scratch)."""
    if cfg.stage.from_scratch:
        return None
    return cfg.stage.init_checkpoint or None


def resolve_init(cfg: Config, engine: Engine) -> InitSource | None:
    """What this run's engine loads for ``stage.init_checkpoint`` (``launch.train.init_source``), or None;
    ``UserError`` when there is nothing it can load there, or a Hugging Face model of another shape.
    Preflight and both trainers call this: they load what preflight checked."""
    init = init_checkpoint(cfg)
    if not init:
        return None
    source = init_source.resolve_init(init, engine.init_formats, engine.name)
    if source.format is Format.hf:
        problem = init_source.llama_problem(cfg) if Format.megatron in engine.init_formats else None
        if problem:
            raise UserError(f"stage.init_checkpoint={init}: a Hugging Face model, which the {engine.name} trainer "
                            f"imports only for the Llama and Mixtral families; {problem}\n  fix: a Megatron-Core "
                            "checkpoint of this model, or a Llama/Mixtral model preset")
        problems = init_source.hf_problems(cfg, source.path)
        if problems:
            raise UserError(f"stage.init_checkpoint={init}: the Hugging Face model in {source.path} is not model="
                            f"{cfg.model.name}: {'; '.join(problems)}\n  fix: set model.* to the checkpoint's "
                            "shape, or name a checkpoint of this model")
    return source


def resolve_reference(cfg: Config, engine: Engine) -> InitSource | None:
    """DPO's frozen reference: what ``stage.reference_checkpoint`` leads to (found as ``stage.init_checkpoint``
    is), else the init checkpoint's; None for another stage, or from scratch (a copy of the initial weights)."""
    if cfg.stage.kind != StageKind.dpo:
        return None
    ref = cfg.stage.reference_checkpoint
    if not ref:
        return resolve_init(cfg, engine)
    key = "stage.reference_checkpoint"
    source = init_source.resolve_init(ref, engine.init_formats, engine.name, key=key)
    problems = init_source.hf_problems(cfg, source.path) if source.format is Format.hf else []
    if problems:
        raise UserError(f"{key}={ref}: the Hugging Face model in {source.path} is not model={cfg.model.name}: "
                        f"{'; '.join(problems)}\n  fix: the reference is the policy's architecture: name a "
                        "checkpoint of this model")
    return source


def preflight(run_dir: Path, record: RunConfig, engine: Engine) -> tuple[str | None, int, Path | None]:
    """(problem, its exit code; or None, 0, the step directory to resume from or None). No torch."""
    cfg = record.cfg
    if not trains(cfg.stage.kind, cfg.backend.name):
        return (f"stage.kind={cfg.stage.kind.name}: the {cfg.backend.name.name} trainer does not train this stage "
                "yet"), EXIT_NOT_BUILT, None
    problem = engine.unsupported(cfg)
    if problem:
        return problem, EXIT_NOT_BUILT, None
    try:
        check_data(cfg)  # the prepared shards; for sft, the chat JSONL files
    except MissingData as exc:
        return str(exc), EXIT_USER, None
    try:
        resolve_init(cfg, engine)
        resolve_reference(cfg, engine)
    except UserError as exc:
        return "\n".join(exc.problems), EXIT_USER, None
    ckpt_dir = ckpt.checkpoint_dir(cfg, run_dir)
    problem = ckpt.writable_problem(ckpt_dir)  # here, not at the first save an interval later
    if problem:
        return problem, EXIT_USER, None
    try:  # the cheap checks (sizes); the trainer verifies checksums across its ranks
        resume = ckpt.find_resume(ckpt_dir)
        refusal = resume and ckpt.resume_refusal(resume, record.raw, cfg.backend.name)
    except UserError as exc:
        resume = None
        refusal = "\n".join(exc.problems)
    if refusal:
        return refusal, EXIT_USER, None
    return None, 0, resume


def cpu_devices(cfg: Config) -> bool:
    """The cluster profile declares CPU processes, not GPUs (``cluster.gpu.name: cpu``: local, slurm_local).

    Only then does a trainer fall back to gloo and (Megatron-Core) redirect torch.cuda to the CPU.
    """
    return cfg.cluster.gpu.name.strip().lower() == "cpu"


def device_problem(cfg: Config) -> tuple[str | None, int]:
    """(why this GPU profile cannot train here, its exit code), or (None, 0).

    A torch built without CUDA is this virtualenv's problem on every node: a configuration
    error (exit 2, not requeued). A CUDA build that sees no device is this node's: exit 4.
    """
    import torch

    if cpu_devices(cfg) or torch.cuda.is_available():
        return None, 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only build of torch)"
    code = EXIT_NO_DEVICE if torch.version.cuda else EXIT_USER
    return (f"cluster.gpu.name={cfg.cluster.gpu.name}: this job asks for GPUs, but torch {torch.__version__} "
            f"({built}) sees no CUDA device on {socket.gethostname()}"
            f"{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}; nothing was trained\n"
            "  fix: check the node's driver (nvidia-smi) and that this virtualenv has a CUDA build of torch; "
            "to train on CPU processes, use cluster=local or cluster=slurm_local"), code
