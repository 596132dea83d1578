"""What a resumed run may change, and why a checkpoint refuses this run: one rule for the login node and the job.

``submit`` asks before the job queues (``launch.record.checkpoints.resume_problem``);
the job asks again before it builds anything (``launch.train.preflight``). Resuming
with a changed config is refused, naming the keys, except for the keys in
``RESUMABLE`` (the run's length, bookkeeping, where things are, how the job is
scheduled), the estimator's assumptions, and a backend's ``ALSO_RESUMABLE``.
"""

from __future__ import annotations

from pathlib import Path

from launch.config.schema import BackendName
from launch.record.read import RECORD_VERSION

RESUMABLE = (
    "name",
    "train.tokens", "train.steps",  # extend (or shorten) the run: the schedule follows the new total
    "train.log_interval", "train.eval_interval", "train.eval_iters",
    "train.checkpoint_interval", "train.checkpoint_dir", "train.keep_checkpoints", "train.rank_check_s",
    "train.rank_check_min_busbw_gbps", "train.hang_timeout_s",
    "train.guard.*",  # the policy for bad numbers: a run that diverged resumes with its bounds changed
    "data.prepared_dir",  # the shards' location; their content is the sources below
    "data.tokenizer", "data.sources.*.path", "data.sources.*.text_key",  # read by prepare, not here
    "data.prepare_on",  # how the shards were made
    "cluster.*",  # scheduling: partition, time limit, container, env... (the world size is checked apart)
    "estimate.*", "submit.*", "pipeline", "wandb.*",
)
"""Keys a resumed run may change. Everything else (model, parallel, data mixture and split, stage,
optim, backend, train.global_batch_size/precision/seed) must match the checkpoint."""

NOT_RESUMABLE = ("cluster.nodes", "cluster.gpus_per_node")
"""The world size: ZeRO shards are saved per data-parallel rank and reload only on the same number."""

ALSO_RESUMABLE = {
    BackendName.megatron: (
        "parallel.tp", "parallel.pp", "parallel.vpp", "parallel.cp", "parallel.ep", "parallel.etp",
        "parallel.micro_batch_size", "parallel.sequence_parallel", "parallel.recompute", "parallel.zero_stage",
        "parallel.offload_optimizer", "parallel.offload_params", "parallel.allow_tp_across_nodes",
        "parallel.num_layers_in_first_pipeline_stage", "parallel.num_layers_in_last_pipeline_stage",
        "parallel.account_for_embedding_in_pipeline_split", "parallel.account_for_loss_in_pipeline_split",
        "cluster.nodes", "cluster.gpus_per_node",
    ),
}
"""Keys a backend's resume may change besides ``RESUMABLE``. Megatron-Core's distributed checkpoints
reshard across tp/pp/vpp/dp (and so the world size), and the data order is global: the layout may change."""


def flatten(node, prefix: str = "") -> dict:
    """{dotted key: leaf} of a nested dict/list config."""
    out = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        for i, v in enumerate(node):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = node
    return out


def _matches(key: str, pattern: str) -> bool:
    parts, pats = key.split("."), pattern.split(".")
    if len(parts) < len(pats):
        return False
    return all(p == "*" or p == k for p, k in zip(pats, parts))


def _resumable(key: str) -> bool:
    if any(_matches(key, p) for p in NOT_RESUMABLE):
        return False
    return any(_matches(key, p) for p in RESUMABLE)


def config_diff(saved: dict, current: dict, also_resumable: tuple[str, ...] = ()) -> list[str]:
    """The keys that differ between the checkpoint's config and this run's, ignoring RESUMABLE ones
    and ``also_resumable`` (a backend's own: Megatron's checkpoints reshard to another layout).

    Each entry reads ``key: saved -> current`` (``<absent>`` for a key only one side has).
    """
    a, b = flatten(saved), flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if _resumable(key) or any(_matches(key, p) for p in also_resumable):
            continue
        old, new = a.get(key, "<absent>"), b.get(key, "<absent>")
        if old != new:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out


def refusal(step_dir: Path, marker: dict, raw: dict, backend: BackendName) -> str | None:
    """Why this run (``raw``: its resolved config) may not resume from ``step_dir`` (``marker``: its
    trainctl.json): a record newer than this trainctl, or a config that differs; None if it may."""
    version = marker.get("record_version", 0)
    if not isinstance(version, int) or version > RECORD_VERSION:
        return (f"refusing to resume from {step_dir}: it was saved by a newer trainctl (record version "
                f"{version}; this one reads up to {RECORD_VERSION})\n  fix: resume with the trainctl that saved it")
    also_resumable = ALSO_RESUMABLE.get(backend, ())
    diff = config_diff(marker.get("config", {}), raw, also_resumable)
    if not diff:
        return None
    layout = ", the parallel layout" if also_resumable else ""
    return (f"refusing to resume from {step_dir}: the config differs from the checkpoint's in {len(diff)} "
            "key(s):\n  " + "\n  ".join(diff) +
            f"\nonly the run's length (train.steps, train.tokens), intervals, paths, scheduling{layout} and "
            "logging may change on resume; start a new run (another name or train.checkpoint_dir) to change the rest")
