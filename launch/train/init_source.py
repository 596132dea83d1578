"""``stage.init_checkpoint``: which weights a run starts from, found the same way by both trainers. No torch.

The key may name a run directory, its checkpoint directory, a finished run's ``final/``, a committed
step directory, or a Hugging Face model directory. ``resolve_init`` walks from there to something the
engine loads, in the engine's order of preference (``launch.train.preflight.ENGINES``):

- a Hugging Face model: ``config.json`` with safetensors weights (``model.safetensors`` or an index);
  what every ``final/`` is, whichever backend trained it;
- a Megatron-Core distributed checkpoint (``metadata.json`` of ``torch_dist``): a step directory, or
  the ``megatron/`` directory a Megatron run keeps beside its Hugging Face export in ``final/``
  (the Megatron trainer prefers it: the same weights, nothing to convert).

A run directory leads to its checkpoint directory (``train.checkpoint_dir`` from its ``config.yaml``,
else ``checkpoints/``), a checkpoint directory to its ``final/``; without one (a run that has not
finished), the Megatron trainer takes the newest committed step (through ``latest``, checked as a
resume checks it) and says so, the DeepSpeed trainer refuses (its steps are ZeRO shards). The
``latest`` file itself is refused with the directory to name instead: it holds a step's name, not
weights. Every refusal is a ``UserError`` (exit 2) naming the key, the path and the fix.

``hf_problems`` compares a Hugging Face ``config.json`` with ``model.*``: a checkpoint of another shape
would load into the wrong model (DeepSpeed builds the checkpoint's architecture, not the plan's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from launch.config.schema import Activation, Config, Normalization, PositionEmbedding
from launch.errors import UserError
from launch.record import checkpoints as ckpt

KEY = "stage.init_checkpoint"
MEGATRON_SUBDIR = "megatron"
"""Where a Megatron run's ``final/`` keeps its distributed checkpoint, beside the Hugging Face files."""
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


class Format(Enum):
    hf = "Hugging Face model"
    megatron = "Megatron-Core distributed checkpoint"


@dataclass(frozen=True)
class InitSource:
    path: Path
    format: Format
    note: str = ""
    """How it was found from what the key names ("" when the key names it)."""


def is_hf(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any((directory / n).is_file() for n in HF_WEIGHTS)


def is_megatron(directory: Path) -> bool:
    try:
        return "sharded_backend" in json.loads((directory / "metadata.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _here(directory: Path, formats: tuple[Format, ...]) -> tuple[InitSource | None, list[Format]]:
    """(what the engine takes in ``directory`` itself, by preference; the formats found there)."""
    found = {}
    if is_hf(directory):
        found[Format.hf] = InitSource(directory, Format.hf)
    if is_megatron(directory):
        found[Format.megatron] = InitSource(directory, Format.megatron)
    elif is_megatron(directory / MEGATRON_SUBDIR):
        found[Format.megatron] = InitSource(directory / MEGATRON_SUBDIR, Format.megatron)
    for f in formats:
        if f in found:
            return found[f], list(found)
    return None, list(found)


def resolve_init(path: str | Path, formats: tuple[Format, ...], engine: str, key: str = KEY) -> InitSource:
    """What ``stage.init_checkpoint=path`` loads for an engine taking ``formats`` (first preferred);
    ``UserError`` naming the fix when there is nothing it can load (``key``: what the messages call the path)."""
    given = Path(path).expanduser()
    if given.is_file():
        if given.name == "latest":
            raise UserError(f"{key}={path}: this is the `latest` pointer of a checkpoint directory (it holds a "
                            f"step's name, not weights)\n  fix: {key}={given.parent} (its final/ is used, else the "
                            "step latest names)")
        raise UserError(f"{key}={path}: a file, not a checkpoint directory\n  fix: name the directory that holds "
                        "the checkpoint (a run directory, its checkpoints/ or final/, or a Hugging Face model)")
    if not given.is_dir():
        raise UserError(f"{key}={path}: no such directory\n  fix: the previous stage's run directory or its "
                        "checkpoints/final, or a local Hugging Face model directory")
    given = given.absolute()
    source, found = _here(given, formats)
    if source or found:
        return source or _refuse(path, found, engine, key)
    ckpt_dir, via = _checkpoint_dir(given)
    final = ckpt_dir / "final"
    if final.is_dir():
        source, found = _here(final, formats)
        if source:
            return InitSource(source.path, source.format, f"{via}final/ of {given}")
        return _refuse(f"{path} ({final})", found, engine, key)
    step = _newest_step(ckpt_dir, key)
    if step is not None:
        if Format.megatron in formats and is_megatron(step):
            return InitSource(step, Format.megatron, f"{via}no final/ there (the run has not finished): the "
                                                     f"weights of its newest committed step, {step.name}")
        raise UserError(f"{key}={path}: the run has not finished (no final/ in {ckpt_dir}), and its step "
                        f"checkpoints are not a {' or '.join(f.value for f in formats)}, which the {engine} trainer "
                        f"loads\n  fix: let the run finish (its final/ is a Hugging Face model), or name "
                        "another checkpoint")
    raise UserError(f"{key}={path}: no checkpoint there (looked for a Hugging Face model: config.json and "
                    f"{' or '.join(HF_WEIGHTS)}; a Megatron-Core checkpoint: metadata.json; a checkpoint directory: "
                    "final/ or step_*; a run directory: config.yaml or checkpoints/)\n  fix: the previous stage's "
                    "run directory or its checkpoints/final, or a local Hugging Face model directory")


def _refuse(path, found: list[Format], engine: str, key: str):
    if found == [Format.megatron]:
        raise UserError(f"{key}={path}: a {Format.megatron.value}, which the {engine} trainer cannot load\n  "
                        f"fix: export it to a Hugging Face model (python -m launch.train.megatron.export "
                        f"CHECKPOINT OUT_DIR) and name OUT_DIR, or name the Megatron run's final/ (a Hugging Face "
                        "model since trainctl exports one there)")
    raise UserError(f"{key}={path}: found {', '.join(f.value for f in found) or 'nothing'}, which the {engine} "
                    "trainer cannot load\n  fix: name a Hugging Face model directory")


def _checkpoint_dir(directory: Path) -> tuple[Path, str]:
    """(the checkpoint directory of a run directory, or ``directory`` itself; how it was reached)."""
    if (directory / "config.yaml").is_file():
        from launch.record.read import read_config

        found = ckpt.checkpoint_dir(read_config(directory).cfg, directory)
        return found, ("the run's " if found == directory / "checkpoints" else f"the run's train.checkpoint_dir "
                                                                                f"{found}: ")
    if (directory / "checkpoints").is_dir():
        return directory / "checkpoints", "the run's "
    return directory, ""


def _newest_step(ckpt_dir: Path, key: str) -> Path | None:
    """The step a resume would take (``latest``'s, passing the cheap checks); a damaged set raises UserError."""
    try:
        return ckpt.find_resume(ckpt_dir)
    except UserError as exc:
        raise UserError(f"{key}: {exc.problems[0]}") from None


# --- a Hugging Face checkpoint against model.* --------------------------------------------------

def hf_problems(cfg: Config, directory: Path) -> list[str]:
    """Where the Hugging Face model in ``directory`` differs from ``model.*`` (empty: it fits)."""
    try:
        got = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"{directory / 'config.json'} unreadable ({exc})"]
    m = cfg.model
    moe = bool(m.num_experts and m.num_experts > 1)
    rope = got.get("rope_parameters") or {}
    scaling = got.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    want = {
        "model_type": ("mixtral" if moe else "llama", got.get("model_type"), "model.num_experts"),
        "hidden_size": (m.hidden_size, got.get("hidden_size"), "model.hidden_size"),
        "intermediate_size": (m.ffn_hidden_size, got.get("intermediate_size"), "model.ffn_hidden_size"),
        "num_hidden_layers": (m.num_layers, got.get("num_hidden_layers"), "model.num_layers"),
        "num_attention_heads": (m.num_attention_heads, got.get("num_attention_heads"), "model.num_attention_heads"),
        "num_key_value_heads": (m.num_query_groups or m.num_attention_heads,
                                got.get("num_key_value_heads") or got.get("num_attention_heads"),
                                "model.num_query_groups"),
        "head_dim": (m.kv_channels or m.hidden_size // m.num_attention_heads,
                     got.get("head_dim") or (got.get("hidden_size") or 0) // max(got.get("num_attention_heads") or 1, 1),
                     "model.kv_channels"),
        "vocab_size": (m.vocab_size, got.get("vocab_size"), "model.vocab_size"),
        "tie_word_embeddings": (not m.untie_embeddings_and_output_weights, bool(got.get("tie_word_embeddings")),
                                "model.untie_embeddings_and_output_weights"),
        "rope_theta": (float(m.rotary_base), _float(rope.get("rope_theta", got.get("rope_theta"))), "model.rotary_base"),
        "rope_type": ("default", rope_type, "(no rope scaling in model.*)"),
        "rms_norm_eps": (float(m.norm_epsilon), _float(got.get("rms_norm_eps")), "model.norm_epsilon"),
    }
    if moe:
        want["num_local_experts"] = (m.num_experts, got.get("num_local_experts"), "model.num_experts")
        want["num_experts_per_tok"] = (m.moe_router_topk, got.get("num_experts_per_tok"), "model.moe_router_topk")
    return [f"{name}: the checkpoint has {have}, {key} makes {expected}"
            for name, (expected, have, key) in want.items() if have != expected]


def _float(value) -> float | None:
    return float(value) if value is not None else None


def llama_problem(cfg: Config) -> str | None:
    """Why ``model.*`` is not a Llama or Mixtral (the families with a Hugging Face mapping), or None."""
    m = cfg.model
    if m.position_embedding_type != PositionEmbedding.rope:
        return f"model.position_embedding_type={m.position_embedding_type.value} (Llama/Mixtral use rope)"
    if m.normalization != Normalization.RMSNorm:
        return f"model.normalization={m.normalization.value} (Llama/Mixtral use RMSNorm)"
    if m.activation != Activation.swiglu:
        return f"model.activation={m.activation.value} (Llama/Mixtral use swiglu)"
    if m.add_bias_linear:
        return "model.add_bias_linear=true (Llama/Mixtral have no linear biases)"
    return None
