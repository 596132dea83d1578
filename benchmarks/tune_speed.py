"""Time ``trainctl tune``'s search: every layout of a model on a cluster, judged by the estimator.

Target (issue 8): the full search for Llama 3 405B on 16,384 GPUs finishes in a
few seconds on a login node. Two figures: the search alone, in-process (median of
``--runs``), and the whole command as a fresh process (compose, search, print,
write tune.json and the layout), as a user sees it.

    python benchmarks/tune_speed.py [--recipe llama3_405b_pretrain_h100] [--runs 3] [override ...]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.config.compose import compose_config  # noqa: E402
from launch.verbs.tune import search  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="llama3_405b_pretrain_h100")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="more overrides, e.g. cluster.nodes=1024")
    args = parser.parse_args()
    overrides = [f"recipe={args.recipe}", *args.overrides]
    cfg = compose_config(overrides)
    times, found = [], None
    for _ in range(args.runs):
        start = time.perf_counter()
        found = search(cfg)
        times.append(time.perf_counter() - start)
    print(f"{' '.join(overrides)}: {found.current.derived.world_size:,} GPUs, {len(found.ranked) + len(found.rejected):,} layouts, "
          f"{len(found.ranked):,} fit")
    print(f"  search, in-process (median of {args.runs})  {statistics.median(times):6.2f} s")

    trainctl = Path(sys.executable).with_name("trainctl")
    command = [str(trainctl)] if trainctl.exists() else [sys.executable, "-m", "launch"]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([*command, "tune", *overrides], cwd=tmp, check=True, capture_output=True)
        print(f"  trainctl tune, a fresh process            {time.perf_counter() - start:6.2f} s")


if __name__ == "__main__":
    main()
