"""The vLLM server step of an RL stage's job script (``stage.rollout.engine=vllm_server``).

The allocation gets ``cluster.nodes + stage.rollout.nodes`` nodes: the first ``cluster.nodes`` train (the
health step checks every node first), the last run ``trl vllm-serve`` as their own srun step in the
background, and the script polls the server's ``/health`` (``stage.rollout.server_timeout_s`` at most)
before the training step starts; the trainer reaches the server at ``$TRAINCTL_ROLLOUT_HOST``
(launch/train/rollout.py). What the script does when the server never answers is in slurm/job.sbatch.j2
(``start_rollout``).

``trl vllm-serve`` is run as ``PYTHON -m trl.cli.main vllm-serve`` so that it is ``cluster.python``'s TRL,
as every other step is (the ``trl`` console script need not be on the nodes' PATH). In TRL 1.16 it execs
vLLM's own ``vllm serve`` with the flags TRL's client needs (NCCL weight transfer, processed logprobs,
``VLLM_SERVER_DEV_MODE=1``), so its health endpoint is vLLM's ``GET /health`` (TRL's ``VLLMClient.check_server``
polls the same URL). Rendered and checked with shellcheck and TRL's own argument parser here; never run
on a GPU cluster (no vLLM on this machine).
"""

from __future__ import annotations

from launch.config.rollout import HOST_ENV, server_nodes
from launch.config.schema import Config

__all__ = ["HOST_ENV", "server_command", "server_nodes"]

HEALTH_PATH = "/health"
"""vLLM's OpenAI-compatible server answers 200 here once the model is loaded (TRL 1.16's client polls it)."""


def server_command(cfg: Config) -> list[str]:
    """The words after the server step's srun options: ``trl vllm-serve`` with the model, its tensor
    parallelism, the port and the context length. ``$ROLLOUT_MODEL`` is the script's variable (the model
    directory: ``stage.init_checkpoint``, one per point in a job array).

    ``--max-model-len``: model.seq_length, the longest sequence the trainer handles (prompt plus
    completion); without it vLLM sizes its KV cache for the model's full context (128k for Llama 3.1),
    which may not fit. The server's memory share is ``trl vllm-serve``'s default (0.9): the node is vLLM's alone.
    """
    ro = cfg.stage.rollout
    return [cfg.cluster.python, "-m", "trl.cli.main", "vllm-serve", "--model", "$ROLLOUT_MODEL",
            "--tensor-parallel-size", str(ro.tensor_parallel), "--port", str(ro.port),
            "--max-model-len", str(cfg.model.seq_length)]


def template_values(cfg: Config, server_line: str, models: list[str]) -> dict | None:
    """The template's ``rollout`` values, or None when the job runs no server.

    ``server_line``: the whole srun line of the server step (sbatch.py builds it with the shared srun options).
    ``models``: the model directory of each run (one; a job array's points, in order).
    """
    nodes = server_nodes(cfg)
    if not nodes:
        return None
    ro = cfg.stage.rollout
    return {"nodes": nodes, "train_nodes": cfg.cluster.nodes, "port": ro.port, "timeout_s": ro.server_timeout_s,
            "health_path": HEALTH_PATH, "host_env": HOST_ENV, "server_line": server_line, "models": models}
