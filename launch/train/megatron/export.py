"""``python -m launch.train.megatron.export CHECKPOINT OUT_DIR``: a Megatron-Core checkpoint -> a Hugging Face model.

What the Megatron trainer's end-of-run export does (``MegatronModule.export``), for any committed
checkpoint: an older step, a run that stopped before its end, a ``final/`` written before trainctl
exported Hugging Face models. CHECKPOINT is found as ``stage.init_checkpoint`` is
(``launch.train.init_source``: a run directory, its checkpoint directory or ``final/``, or a step
directory); the model's shape comes from the config the checkpoint's ``trainctl.json`` recorded.
One process, no GPU, any layout the checkpoint was saved with (tp, pp, vpp, ep). Exit 2 with one line
on bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from launch.errors import UserError
from launch.record import checkpoints as ckpt
from launch.train.init_source import Format, llama_problem, resolve_init

USAGE = "usage: python -m launch.train.megatron.export CHECKPOINT OUT_DIR"


def export(checkpoint: str, out: Path) -> Path:
    """Write the Hugging Face model of ``checkpoint`` into ``out`` (new or empty); the checkpoint used."""
    from omegaconf import OmegaConf

    from launch.config.schema import Config

    source = resolve_init(checkpoint, (Format.megatron,), "export", key="CHECKPOINT")
    try:
        marker = json.loads((source.path / ckpt.MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{source.path}: no readable {ckpt.MARKER} ({exc}), so the model's shape is unknown\n  fix: "
                        "name a checkpoint trainctl committed") from None
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), marker["config"]))
    except Exception as exc:  # noqa: BLE001 - OmegaConf's errors have no common public base
        raise UserError(f"{source.path / ckpt.MARKER}: its recorded config does not load ({exc})\n  fix: export "
                        "with the trainctl that wrote it") from None
    problem = llama_problem(cfg)
    if problem:
        raise UserError(f"{checkpoint}: not a Llama or Mixtral model ({problem}): no Hugging Face mapping")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: not empty\n  fix: name a new directory")
    out.mkdir(parents=True, exist_ok=True)

    from launch.train.data import eod_id
    from launch.train.megatron import hf
    from launch.train.model import hf_config

    config = hf_config(cfg, eod=eod_id(cfg.data.tokenizer)[1])
    config.dtype = next(iter(hf.checkpoint_keys(source.path).values()))[1]
    hf.finish_export(out, config, hf.export_share(source.path, out, config), cfg.data.tokenizer)
    return source.path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        used = export(argv[0], Path(argv[1]).absolute())
    except UserError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    print(f"exported {used} to {Path(argv[1]).absolute()} (Hugging Face model)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
