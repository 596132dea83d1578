"""Time ``trainctl prepare``'s build of one shard: tokens per second, per process.

The shipped sample (data/sample/{prose,code}.jsonl, ~0.6 MB) is repeated
``--repeat`` times into one temporary jsonl (a few MB), then built into a shard
with the shipped tokenizer: load (datasets) + tokenize (tokenizers, one core per
process) + write (megatron-core IndexedDatasetBuilder) + manifest, exactly what
``trainctl prepare`` runs per source, once with 1 process and once with
``--procs``. Imports are warmed first; each figure is the best of ``--runs``.

    python benchmarks/prepare_speed.py [--repeat 8] [--procs N] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.data import shard  # noqa: E402
from launch.data.prepare import processes  # noqa: E402
from launch.data.sources import fingerprint, resolve, sha256  # noqa: E402
from launch.data.tokenizer import inspect  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def make_source(folder: Path, repeat: int) -> Path:
    """The sample's documents, ``repeat`` times over, in one jsonl."""
    lines = "".join((SAMPLE / name).read_text() for name in ("prose.jsonl", "code.jsonl"))
    path = folder / "sample_x.jsonl"
    path.write_text(lines * repeat)
    return path


def best_build(path: Path, out: Path, procs: int, runs: int) -> tuple[float, dict]:
    """(seconds, manifest) of the fastest of ``runs`` builds of ``path`` with ``procs`` processes."""
    tok_path = SAMPLE / "tokenizer.json"
    tok, tok_sha = inspect(tok_path), sha256(tok_path)
    source = resolve("bench", str(path), "text", 1.0)
    best, manifest = float("inf"), {}
    for _ in range(runs):
        start = time.perf_counter()
        manifest = shard.build(source, fingerprint(source), tok, tok_sha, out, procs)
        best = min(best, time.perf_counter() - start)
    return best, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=8, help="copies of the sample in the benchmark file")
    parser.add_argument("--procs", type=int, default=processes(), help="processes for the parallel figure")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    shard.import_builder()  # warm megatron-core's import (~5-10 s): not part of the figure
    with tempfile.TemporaryDirectory(prefix="prepare-speed-") as tmp:
        path = make_source(Path(tmp), args.repeat)
        mb = path.stat().st_size / 1e6
        rows = []
        for procs in sorted({1, args.procs}):
            seconds, manifest = best_build(path, Path(tmp), procs, args.runs)
            rows.append((manifest["processes"], seconds, manifest["tokens"], manifest["documents"]))
    cpus = os.cpu_count()
    for used, seconds, tokens, docs in rows:
        print(f"{used} process(es): {seconds:.2f} s for {tokens:,} tokens / {docs:,} documents ({mb:.1f} MB): "
              f"{tokens / seconds / 1e6:.2f} M tokens/s, {tokens / seconds / used / 1e6:.2f} M tokens/s per process")
    one = rows[0]
    many = rows[-1]
    print(f"README: trainctl prepare builds ~{one[2] / one[1] / 1e6:.2f} M tokens/s with one process "
          f"(4096-token BPE, {mb:.1f} MB of jsonl, load + tokenize + write), "
          f"{many[2] / many[1] / 1e6:.2f} M tokens/s with {many[0]} processes on {cpus} CPUs")


if __name__ == "__main__":
    main()
