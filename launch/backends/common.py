"""What every translator reads the same way: data paths, the mixture, checkpoint paths, number formatting,
and the MoE and FP8 settings both Megatron translations (megatron.yaml, megatron_args.txt) pass on.

Pure functions of the typed config; no torch, deepspeed or megatron here.
"""

from __future__ import annotations

import posixpath

from dataclasses import dataclass

from launch.config.schema import Config, StageKind


@dataclass(frozen=True)
class MoeSettings:
    """How MoE layers route and balance: settings trainctl chooses, not keys of the schema."""

    load_balancing: str = "aux_loss"
    """The router's load balancing (GShard/Switch auxiliary loss)."""
    aux_loss_coeff: float = 1e-2
    """Weight of that loss: Megatron-Core's Mixtral example (megatron-core's default 0 balances nothing)."""
    token_dispatcher: str = "alltoall"
    """The dispatcher for expert parallelism (megatron-core's default: allgather)."""


MOE = MoeSettings()


@dataclass(frozen=True)
class Fp8Recipe:
    """TransformerEngine's FP8 recipe under train.precision=fp8: NeMo's H100 recipe."""

    format: str = "hybrid"
    """E4M3 in the forward pass, E5M2 for gradients."""
    recipe: str = "delayed"
    """Delayed scaling: each tensor's scale from the amax history of earlier steps."""
    amax_history_len: int = 1024
    """Steps of amax history kept per tensor (megatron-core's default: 1)."""
    amax_compute_algo: str = "max"
    """The scale comes from the largest amax of that history (megatron-core's default: most_recent)."""


FP8 = Fp8Recipe()


def indexed_prefix(cfg: Config, source: str) -> str:
    """Path prefix of the ``.bin``/``.idx`` pair ``trainctl prepare`` writes for a source.

    The contract with ``prepare``: ``{data.prepared_dir}/{source}.bin`` and ``.idx``,
    one pair per source of the mixture (Megatron's indexed dataset format).
    """
    return posixpath.join(cfg.data.prepared_dir, source)


def reads_raw_chat(cfg: Config) -> bool:
    """Post-training stages read the chat JSONL files themselves, not tokenized shards."""
    return cfg.stage.kind != StageKind.pretrain


def blend(cfg: Config) -> tuple[list[str], list[float]]:
    """The mixture as (paths, weights), weights normalised to sum to 1, in the order of ``data.sources``.

    Pretraining reads the indexed shards ``prepare`` wrote; SFT and DPO read the
    JSONL sources as they are (each line one conversation or preference pair).
    """
    sources = cfg.data.sources
    total = sum(s.weight for s in sources.values()) or 1.0
    paths = [s.path if reads_raw_chat(cfg) else indexed_prefix(cfg, name) for name, s in sources.items()]
    return paths, [s.weight / total for s in sources.values()]


def checkpoint_dir(cfg: Config, run_dir: str | None) -> str:
    """``train.checkpoint_dir``, else ``RUN_DIR/checkpoints`` (relative when no run directory is given)."""
    if cfg.train.checkpoint_dir:
        return cfg.train.checkpoint_dir
    return posixpath.join(str(run_dir), "checkpoints") if run_dir else "checkpoints"


def in_run_dir(run_dir: str | None, name: str) -> str:
    return posixpath.join(str(run_dir), name) if run_dir else name


def num(x: float | int) -> str:
    """A number as a flag value: integers plain, floats in the shortest form that reads back exactly."""
    if isinstance(x, bool):
        raise TypeError("booleans are flags, not values")
    if isinstance(x, int):
        return str(x)
    return repr(float(x))  # 1e-05, 0.0003, 1.0: what Python's float() reads back exactly


def split_string(cfg: Config) -> str:
    """``data.split`` as Megatron's "train,valid,test" string (Megatron normalises it)."""
    return ",".join(f"{x:g}" for x in cfg.data.split)


def wsd_decay_steps(cfg: Config, steps: int) -> int:
    """Steps of the final decay of a warmup-stable-decay schedule: optim.decay_fraction of the run."""
    return max(1, round(cfg.optim.decay_fraction * steps))


def tokenizer_dir(cfg: Config) -> str:
    """The directory holding data.tokenizer's tokenizer.json: what Hugging Face's AutoTokenizer loads."""
    path = cfg.data.tokenizer
    return posixpath.dirname(path) if path.endswith(".json") else path
