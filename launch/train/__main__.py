"""``python -m launch.train RUN_DIR``: the entrypoint torchrun starts on every rank.

It reads RUN_DIR/config.yaml (the resolved config ``render`` wrote) and runs
the rank check (``train.rank_check_s > 0``) or the backend's trainer: DeepSpeed
(``launch.train.deepspeed_trainer``) or Megatron-Core
(``launch.train.megatron_trainer``).
"""

from __future__ import annotations

import sys
from pathlib import Path

EXIT_NOT_BUILT = 3


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m launch.train RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0]).absolute()
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    seconds = float(cfg.train.rank_check_s)
    if seconds > 0:
        from launch.train.rankcheck import rank_check

        return rank_check(run_dir, seconds)
    if cfg.backend.name == "deepspeed":
        from launch.train.deepspeed_trainer import main as train_deepspeed

        return train_deepspeed(run_dir)
    if cfg.backend.name == "megatron":
        from launch.train.megatron_trainer import main as train_megatron

        return train_megatron(run_dir)
    print(f"trainctl: there is no {cfg.backend.name} trainer; "
          "train.rank_check_s=60 runs an allocation check instead", file=sys.stderr, flush=True)
    return EXIT_NOT_BUILT


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
