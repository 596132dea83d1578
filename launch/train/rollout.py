"""``stage.rollout.*`` as TRL 1.16's GRPOConfig / RLOOConfig generation keys: ``trl_vllm_args(cfg, env)``.

The GRPO/RLOO trainer (launch/train, another module) passes these to TRL's config; TRL then owns the
generation: ``hf`` is its ``model.generate()`` path; ``vllm_colocate`` starts vLLM inside each rank
(``vllm_mode="colocate"``); ``vllm_server`` connects rank 0 to the server the job script started on the
allocation's last node (``vllm_mode="server"``, host from ``$TRAINCTL_ROLLOUT_HOST``, which the script
exports; launch/executors/rollout.py). Key names checked against trl/trainer/grpo_config.py (1.16.0), and
the same in rloo_config.py. No torch or TRL import here: plain values.
"""

from __future__ import annotations

from typing import Mapping

from launch.config.rollout import HOST_ENV
from launch.config.schema import Config, RolloutEngine
from launch.errors import UserError


def trl_vllm_args(cfg: Config, env: Mapping[str, str]) -> dict:
    """GRPOConfig keyword arguments for the stage's rollout engine.

    colocate: vLLM's share of each GPU and its tensor parallelism (TRL groups that many ranks around one
    vLLM); ``vllm_max_model_length`` is model.seq_length, the longest sequence the trainer handles (else vLLM
    sizes its KV cache for the model's whole context). server: where the server listens and how long TRL's
    client waits for it (the job script already waited for ``/health``, so this is a second, cheap check);
    tensor parallelism and memory are the server's own flags, in its srun step. ``env``: the rank's
    environment (``os.environ``).
    """
    ro = cfg.stage.rollout
    if ro.engine == RolloutEngine.hf:
        return {"use_vllm": False}
    if ro.engine == RolloutEngine.vllm_colocate:
        return {"use_vllm": True, "vllm_mode": "colocate", "vllm_tensor_parallel_size": ro.tensor_parallel,
                "vllm_gpu_memory_utilization": ro.gpu_memory_utilization,
                "vllm_max_model_length": cfg.model.seq_length}
    host = env.get(HOST_ENV, "")
    if not host:
        raise UserError(f"stage.rollout.engine=vllm_server: ${HOST_ENV} is not set, so the trainer cannot find the "
                        "vLLM server (the job script exports it with the server node's address)\n"
                        "  fix: submit the stage with `trainctl submit` on a Slurm cluster profile, or "
                        f"stage.rollout.engine=vllm_colocate")
    return {"use_vllm": True, "vllm_mode": "server", "vllm_server_host": host, "vllm_server_port": ro.port,
            "vllm_server_timeout": float(ro.server_timeout_s)}
