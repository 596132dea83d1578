"""``trainctl prepare data.prepare_on=slurm``: one job-array task per unfinished shard.

On the login node (``submit_prepare``): check the inputs as ``prepare`` does
(every bad path or tokenizer is an exit-2 error before anything queues), find
the shards that are not finished, write ``RUN_DIR/prepare/config.yaml`` (the
resolved config, data paths made absolute: the tasks may start elsewhere) and
``RUN_DIR/prepare/prepare.sbatch`` (``slurm/prepare.sbatch.j2``), submit it, and
return with the job id. ``RUN_DIR/prepare/job.json`` records the job, so
``trainctl status RUN_DIR/prepare`` follows it.

On a node (``python -m launch.data.array PREPARE_DIR SOURCE``): build that one
shard with the same code as ``prepare`` here. A shard is finished only when its
manifest lands (``launch.data.shard``), so a task that dies leaves nothing that
looks finished and a rerun builds it again. The report (tokens, epochs per
source) comes from running ``trainctl prepare`` again once the array is done:
every shard is then skipped.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from launch.config.schema import Scheduler
from launch.data import shard
from launch.data.prepare import build_one, check_inputs, inspect_tokenizer, output_dir, processes, unfinished
from launch.data.sources import sha256
from launch.errors import UserError
from launch.executors import slurm
from launch.record import jobs
from launch.executors.sbatch import render_prepare
from launch.record.read import read_config

SUBDIR = "prepare"


def _absolute_data_paths(composed) -> None:
    """Make the data paths absolute (relative ones are relative to the submitting directory)."""
    data = composed.data
    data.prepared_dir = str(Path(data.prepared_dir).expanduser().absolute())
    data.tokenizer = str(Path(data.tokenizer).expanduser().absolute())
    for source in data.sources.values():
        source.path = str(Path(source.path).expanduser().absolute())


def submit_prepare(cfg, composed, run_dir: Path) -> bool:
    """Submit the job array for the unfinished shards; False when every shard is finished (nothing queued)."""
    if cfg.cluster.scheduler != Scheduler.slurm:
        raise UserError(f"data.prepare_on=slurm, cluster={cfg.cluster.name}: this cluster has no SLURM scheduler\n"
                        "  fix: cluster=h100 (or your own SLURM profile), or data.prepare_on=here")
    sources, tok_path = check_inputs(cfg.data)
    inspect_tokenizer(tok_path, cfg.data.tokenizer)
    out_dir, _ = output_dir(cfg.data.prepared_dir)
    _, todo = unfinished(shard, sources, sha256(tok_path), out_dir)
    if not todo:
        print("every shard is finished: nothing to submit; the report follows")
        return False
    names = [source.name for source, _, _ in todo]
    prep_dir = run_dir / SUBDIR
    jobs.refuse_if_active(prep_dir)
    fresh_run = not run_dir.exists()
    composed = composed.copy()
    _absolute_data_paths(composed)
    try:
        prep_dir.mkdir(parents=True, exist_ok=True)
        (prep_dir / "config.yaml").write_text(OmegaConf.to_yaml(composed, resolve=True))
        script = prep_dir / "prepare.sbatch"
        script.write_text(render_prepare(cfg, prep_dir, names))
        script.chmod(0o755)
        job_id = slurm.submit(script)
    except BaseException:
        shutil.rmtree(run_dir if fresh_run else prep_dir, ignore_errors=True)
        raise
    jobs.record_submission(prep_dir, job_id, script, array_tasks=names)
    for source, _, why in todo:
        print(f"{source.name}: task {names.index(source.name)} ({why})")
    print(f"submitted job array {job_id} ({len(names)} task(s), one per unfinished shard): {prep_dir}\n"
          f"when it is done, run the same `trainctl prepare` again for the report (finished shards are skipped); "
          f"`trainctl status {prep_dir}` follows it")
    return True


def main(argv: list[str]) -> int:
    """One array task: build the shard of source ``argv[1]`` from ``argv[0]/config.yaml``."""
    if len(argv) != 2:
        print("usage: python -m launch.data.array PREPARE_DIR SOURCE", file=sys.stderr)
        return 2
    prep_dir, name = Path(argv[0]), argv[1]
    try:
        cfg = read_config(prep_dir).cfg  # the one typed reader of a config.yaml (launch/record/read.py)
        sources, tok_path = check_inputs(cfg.data)
        tok = inspect_tokenizer(tok_path, cfg.data.tokenizer)
        tokenizer_sha = sha256(tok_path)
        out_dir, _ = output_dir(cfg.data.prepared_dir)
        mine = [s for s in sources if s.name == name]
        if not mine:
            raise UserError(f"data.sources has no source {name!r} (it has {', '.join(s.name for s in sources)})")
        _, todo = unfinished(shard, mine, tokenizer_sha, out_dir)
        if not todo:
            print(f"{name}: already finished (a requeued or repeated task): skipped", flush=True)
            return 0
        source, fp, why = todo[0]
        procs = processes()
        print(f"{name}: building ({why}) with {procs} process(es)", flush=True)
        manifest = build_one(shard, source, fp, tok, tokenizer_sha, out_dir, procs)
    except UserError as exc:
        print(f"trainctl: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"{name}: finished: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens in "
          f"{out_dir / name}.bin", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
