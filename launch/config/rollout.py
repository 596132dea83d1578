"""An RL stage's rollout engine (``stage.rollout.*``): which settings can run, and the nodes it adds to the job.

Three engines generate the completions (TRL 1.16's GRPO and RLOO trainers drive all three):

- ``hf``: transformers' ``generate()`` inside the training ranks (CPU tests; slow on GPUs);
- ``vllm_colocate``: vLLM inside the training ranks, on their GPUs (TRL ``vllm_mode="colocate"``);
- ``vllm_server``: ``trl vllm-serve`` on dedicated nodes of the same allocation, after the training nodes
  (TRL ``vllm_mode="server"``); the job script (slurm/job.sbatch.j2) starts it as its own srun step and
  waits for its ``/health`` before training starts (launch/executors/rollout.py).

``rollout_settings`` is the validation rule (launch/config/validate.py lists it): each problem names the
key, its value and a fix. No torch here: it runs on the login node.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from launch.config.derive import Derived
from launch.config.problem import Problem, divisors, is_megatron
from launch.config.schema import Config, RolloutConfig, RolloutEngine, Scheduler, StageKind

HOST_ENV = "TRAINCTL_ROLLOUT_HOST"
"""The vLLM server's address, exported by the job script for the trainer (launch/train/rollout.py)."""
MAX_SERVER_NODES = 1
"""``trl vllm-serve`` runs vLLM's own server on one node: its tensor-parallel workers use vLLM's multiproc
executor, which is single-node (more nodes need a Ray cluster, TRL's ``distributed_executor_backend=ray``),
and TRL's client talks to one host:port. One server node is what trainctl renders."""
TRL_GROUP_PORT = 51216
"""TRL's ``vllm_group_port`` default: the NCCL group that pushes the trained weights into the server listens
on this port of the server's node, so the HTTP port must differ."""


def server_nodes(cfg: Config) -> int:
    """Nodes the vLLM server adds to the job's allocation: ``stage.rollout.nodes`` for an RL stage with
    ``engine=vllm_server``, else 0. The training layout (``cluster.nodes``) is unchanged by them."""
    s = cfg.stage
    if s.kind == StageKind.rlhf and s.rollout.engine == RolloutEngine.vllm_server:
        return s.rollout.nodes
    return 0


def rollout_settings(cfg: Config, d: Derived) -> Iterator[Problem]:
    """The rollout engine's settings: only in an RL stage, vLLM only on GPUs, the server only under Slurm on
    one node of its own, tensor parallelism within a node and over the model's heads."""
    s, ro, c = cfg.stage, cfg.stage.rollout, cfg.cluster
    if s.kind != StageKind.rlhf:
        yield from _only_in_rl(cfg)
        return
    engine = {"stage.rollout.engine": ro.engine}
    if ro.engine != RolloutEngine.vllm_server and ro.nodes != 0:
        yield Problem({**engine, "stage.rollout.nodes": ro.nodes},
                      "only the vllm_server engine runs on nodes of its own; this engine generates on the training GPUs",
                      "stage.rollout.nodes=0, or stage.rollout.engine=vllm_server")
    if ro.engine == RolloutEngine.hf or is_megatron(cfg):  # backend_rules refuses RL on Megatron-Core with the route
        return
    if c.gpu.name == "cpu":
        yield Problem({**engine, "cluster": c.name, "cluster.gpu.name": c.gpu.name},
                      "vLLM runs on GPUs only; this cluster profile's \"GPUs\" are CPU processes",
                      "stage.rollout.engine=hf (transformers' generate, on CPU), or a GPU cluster profile (cluster=h100)")
        return
    if not s.init_checkpoint:
        yield Problem({**engine, "stage.init_checkpoint": s.init_checkpoint},
                      "vLLM loads the policy's first weights from a model directory before it can generate",
                      "stage.init_checkpoint=/path/to/hf_model, or stage.rollout.engine=hf")
    yield from _tensor_parallel(cfg)
    if not 0 < ro.gpu_memory_utilization <= 1:
        yield Problem({"stage.rollout.gpu_memory_utilization": ro.gpu_memory_utilization},
                      "a share of each GPU's memory must be in (0, 1]",
                      "stage.rollout.gpu_memory_utilization=0.3 (TRL's default for vllm_colocate)")
    if ro.engine == RolloutEngine.vllm_server:
        yield from _server(cfg)


def _only_in_rl(cfg: Config) -> Iterator[Problem]:
    ro, defaults = cfg.stage.rollout, RolloutConfig()
    changed = {f"stage.rollout.{f.name}": getattr(ro, f.name) for f in dataclasses.fields(ro)
               if getattr(ro, f.name) != getattr(defaults, f.name)}
    if changed:
        yield Problem({"stage": cfg.stage.kind, **changed},
                      f"the rollout engine generates an RL stage's completions; a {cfg.stage.kind.name} stage "
                      "generates none", "stage=rlhf, or leave stage.rollout.* at its defaults ("
                      + " ".join(f"{k}={_typed(getattr(defaults, k.rsplit('.', 1)[1]))}" for k in changed) + ")")


def _tensor_parallel(cfg: Config) -> Iterator[Problem]:
    """vLLM's tensor-parallel group: on one node (its multiproc executor), dividing the heads (vLLM refuses
    otherwise); colocated, TRL groups the training ranks by it (the world must divide evenly)."""
    ro, c, heads = cfg.stage.rollout, cfg.cluster, cfg.model.num_attention_heads
    tp = {"stage.rollout.tensor_parallel": ro.tensor_parallel}
    if ro.tensor_parallel < 1:
        yield Problem(tp, "must be at least 1", "stage.rollout.tensor_parallel=1")
        return
    fits = [k for k in divisors(c.gpus_per_node) if heads % k == 0]
    if c.gpus_per_node % ro.tensor_parallel:
        yield Problem({**tp, "cluster.gpus_per_node": c.gpus_per_node},
                      f"vLLM's tensor-parallel group must fit a node and tile it: {ro.tensor_parallel} does not divide "
                      f"the node's {c.gpus_per_node} GPUs (vLLM's multiproc executor is single-node)",
                      f"choose stage.rollout.tensor_parallel from {fits}")
    elif heads % ro.tensor_parallel:
        yield Problem({**tp, "model.num_attention_heads": heads},
                      f"vLLM splits the {heads} attention heads evenly over its tensor-parallel GPUs",
                      f"choose stage.rollout.tensor_parallel from {fits}")


def _server(cfg: Config) -> Iterator[Problem]:
    ro, c = cfg.stage.rollout, cfg.cluster
    nodes = {"stage.rollout.engine": ro.engine, "stage.rollout.nodes": ro.nodes}
    if c.scheduler != Scheduler.slurm:
        yield Problem({"stage.rollout.engine": ro.engine, "cluster.scheduler": c.scheduler},
                      "the vLLM server runs on dedicated nodes of a Slurm allocation; this profile runs on one machine",
                      "stage.rollout.engine=vllm_colocate (vLLM on the training GPUs), or a Slurm cluster profile")
    if ro.nodes < 1:
        yield Problem(nodes, "the vLLM server needs a node of its own, added to the job's allocation",
                      "stage.rollout.nodes=1")
    elif ro.nodes > MAX_SERVER_NODES:
        yield Problem(nodes, "`trl vllm-serve` serves from one node: its tensor-parallel workers are single-node "
                      "(vLLM's multiproc executor) and TRL's client talks to one host, so more nodes would sit idle",
                      f"stage.rollout.nodes={MAX_SERVER_NODES}, and stage.rollout.tensor_parallel up to "
                      f"cluster.gpus_per_node={c.gpus_per_node} for a larger model")
    if not 1024 <= ro.port <= 65535 or ro.port == TRL_GROUP_PORT:
        why = (f"TRL's weight-sync group (vllm_group_port) listens on {TRL_GROUP_PORT} of the same node"
               if ro.port == TRL_GROUP_PORT else "a port must be in 1024..65535 (lower ones need root)")
        yield Problem({"stage.rollout.port": ro.port}, why, "stage.rollout.port=8000 (vLLM's default)")
    if ro.server_timeout_s < 1:
        yield Problem({"stage.rollout.server_timeout_s": ro.server_timeout_s},
                      "the job script waits this many seconds for the server's /health: it must be positive",
                      "stage.rollout.server_timeout_s=900")


def _typed(value: object) -> str:
    return value.name if isinstance(value, RolloutEngine) else str(value)
