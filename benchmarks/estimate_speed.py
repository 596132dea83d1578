"""Time the plan beyond Hydra's composition: typing, derivation, validation and the estimate.

Target (issue 3): a 405B plan in well under 100 ms beyond composition. Each
figure is the median of repeated in-process calls on one composed config.

    python benchmarks/estimate_speed.py [--recipe llama3_405b_pretrain_h100] [--runs 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.config import derive  # noqa: E402
from launch.config.compose import compose, compose_config  # noqa: E402
from launch.estimate import estimate  # noqa: E402
from launch.verbs.plan import make_plan  # noqa: E402


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="llama3_405b_pretrain_h100")
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    composed = compose([f"recipe={args.recipe}"])
    cfg = compose_config([f"recipe={args.recipe}"])
    d = derive(cfg)
    print(f"recipe={args.recipe}, median of {args.runs} calls")
    print(f"  compose (Hydra, for scale)         {median_ms(lambda: compose([f'recipe={args.recipe}']), 5):7.2f} ms")
    print(f"  make_plan (type, validate, estimate){median_ms(lambda: make_plan(composed), args.runs):7.2f} ms")
    print(f"  estimate alone                     {median_ms(lambda: estimate(cfg, d), args.runs):7.2f} ms")


if __name__ == "__main__":
    main()
