"""Median wall time of `trainctl plan` against a bare @hydra.main app with one config group.

Both run as fresh processes with the same interpreter, alternating, so the
comparison carries the cost a user pays at the prompt: interpreter start,
imports, Hydra's composition, and for trainctl the typed config, validation,
estimate, records and the rich table. Target: trainctl at most 1.5x the bare app.

    python benchmarks/cli_latency.py [--runs 15] [--recipe tiny_local]
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

BARE_APP = '''
import hydra

@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    print(cfg.model.name)

main()
'''


def write_bare_app(where: Path) -> Path:
    (where / "conf" / "model").mkdir(parents=True)
    (where / "conf" / "config.yaml").write_text("defaults:\n  - model: tiny\n  - _self_\n")
    (where / "conf" / "model" / "tiny.yaml").write_text("name: tiny\nnum_layers: 4\nhidden_size: 256\n")
    app = where / "bare_app.py"
    app.write_text(BARE_APP)
    return app


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--recipe", default="tiny_local")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bare = [sys.executable, str(write_bare_app(work)), f"hydra.run.dir={work}/bare"]
        plan = [sys.executable, "-m", "launch", "plan", f"recipe={args.recipe}", f"hydra.run.dir={work}/plan"]
        timed(bare, work), timed(plan, work)  # warm the page cache and .pyc files
        times: dict[str, list[float]] = {"bare": [], "plan": []}
        for _ in range(args.runs):
            times["bare"].append(timed(bare, work))
            times["plan"].append(timed(plan, work))
    bare_s, plan_s = statistics.median(times["bare"]), statistics.median(times["plan"])
    print(f"runs: {args.runs} each, python {sys.version.split()[0]}")
    print(f"bare @hydra.main app, one group : {bare_s * 1000:7.0f} ms median")
    print(f"trainctl plan recipe={args.recipe:<11}: {plan_s * 1000:7.0f} ms median")
    print(f"ratio: {plan_s / bare_s:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
