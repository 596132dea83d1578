"""``trainctl tune tune.probe=true``: check the estimator's top layouts with short real runs.

The top ``tune.top_k`` layouts become runs of ``tune.probe_steps`` steps in
RUN_DIR/probes/1..K (each an ordinary run directory: config.yaml, plan.json,
job.sbatch), submitted together as one Slurm job array (``launch.verbs.submit.submit_array``:
every probe asks for the same nodes). ``trainctl tune`` with the same overrides
afterwards finds RUN_DIR/probes/probes.json, reads each probe's metrics.jsonl,
re-ranks the probes by measured step time, and writes RUN_DIR/calibration.json:
the measured/predicted ratios of step time and peak memory for this cluster,
which the estimator applies wherever ``cluster.calibration`` names the file
(launch/estimate/calibration.py).

Measured step time: the median of a probe's logged windows after the first
(the first holds start-up: data loader, allocator warm-up, NCCL setup), against
the prediction without any calibration already applied. Measured memory: the
largest ``peak_memory_gib`` a probe logged, when it is GPU memory (rank 0's
``torch.cuda.max_memory_allocated``: tensors only), against the predicted tensors
of the first pipeline stage; the ratio then scales the estimate's tensors, not
its fixed overheads. A CPU run's peak RSS is shown but calibrates nothing.

Probes keep nothing: checkpoints go to their own directories, none is saved at
the end (``train.save_final=false``). Probes recorded for another search (other
nodes, batch, model, cluster) are refused rather than compared.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import math
import statistics
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from launch.config.schema import Scheduler
from launch.errors import UserError
from launch.estimate.memory import GIB, stage_memory
from launch.estimate.perf import step_terms
from launch.verbs.plan import make_plan
from launch.verbs.records import run_files
from launch.record.write import dump_json, write_file, write_run
from launch.verbs.submit import check_submittable, submit_array
from launch.verbs.tune import overrides

PROBES = "probes"
RECORD = "probes.json"


def probe_dir(run_dir: Path) -> Path:
    return run_dir / PROBES


def check_probeable(cfg) -> None:
    if cfg.cluster.scheduler != Scheduler.slurm:
        raise UserError(f"cluster={cfg.cluster.name}, tune.probe=true: probes run as a Slurm job array, and this "
                        "cluster has no scheduler\n  fix: a Slurm cluster profile (cluster=h100), or tune.probe=false")


def probe_config(composed: DictConfig, parallel, steps: int, name: str) -> DictConfig:
    """The user's config with the whole ``parallel`` layout (every key, as the tuned YAML has them) and a
    short run: ``steps`` steps logged in windows of a quarter of them, no validation, checkpoints in the
    probe's own directory and none kept at the end."""
    probe = copy.deepcopy(composed)  # still typed by the schema: a wrong value fails as it would on the CLI
    with open_dict(probe):
        probe.name = name
        probe.parallel = OmegaConf.structured(parallel)
        probe.train.steps, probe.train.tokens = steps, None
        probe.train.rampup_batch_size = None
        probe.train.log_interval = max(1, steps // 4)
        probe.train.eval_interval = 0
        probe.train.checkpoint_dir = None  # never the user's own run's checkpoints
        probe.train.checkpoint_interval = steps  # no save before the end, and train.save_final=false at the end
        probe.train.save_final = False
        probe.optim.warmup_steps = min(probe.optim.warmup_steps, max(steps // 2, 1))
        probe.tune.probe = False
        probe.pipeline = []
    return probe


def searched(cfg) -> dict:
    """What a probe's prediction depends on besides the layout: probes recorded for another search
    (other nodes, batch, model, cluster) are not compared with this one's."""
    c = cfg.cluster
    return {"cluster": c.name, "gpu": c.gpu.name, "model": cfg.model.name, "nodes": c.nodes,
            "gpus_per_node": c.gpus_per_node, "seq_length": cfg.model.seq_length,
            "global_batch_size": cfg.train.global_batch_size, "backend": cfg.backend.name.name,
            "precision": cfg.train.precision.name}


def uncalibrated(cfg, cand) -> dict:
    """The probe's prediction without any cluster.calibration already applied (so that a new calibration
    is measured against the bare model, not against the last one): the step time, and the tensors of the
    first pipeline stage, what rank 0's ``torch.cuda.max_memory_allocated`` measures."""
    variant = dataclasses.replace(cfg, parallel=cand.parallel)
    first = stage_memory(variant, cand.derived)[0]  # uncalibrated: states and activations of the bare model
    return {"step_time_s": step_terms(variant, cand.derived).step_s,  # the model's, before cluster.calibration
            "first_stage_tensors_gib": (first.states.total + first.activations) / GIB,
            "per_gpu_peak_gib": cand.memory["per_gpu_peak"]}


def submit(composed: DictConfig, found, run_dir: Path) -> None:
    """Render the top K layouts as probe runs and submit them as one job array; record them once queued."""
    cfg = found.cfg
    check_probeable(cfg)
    folder = probe_dir(run_dir)
    top = found.ranked[:cfg.tune.top_k]
    planned = []
    for rank, cand in enumerate(top, start=1):
        plan = make_plan(probe_config(composed, cand.parallel, cfg.tune.probe_steps, f"{cfg.name}_probe{rank}"))
        check_submittable(plan.cfg, folder / str(rank))
        planned.append((rank, cand, plan, overrides(cand, cfg.backend.name)))
    points, record = [], []
    for rank, cand, plan, keys in planned:
        directory = folder / str(rank)
        write_run(directory, run_files(plan, directory, ["trainctl", "tune", *keys], keys, with_job_script=True))
        points.append((plan, directory, keys))
        record.append({"rank": rank, "run_dir": str(directory), "overrides": keys,
                       "predicted": uncalibrated(cfg, cand)})
    if submit_array(points, folder) is None:  # submit.preflight=true: nothing queued, nothing to wait for
        return
    write_file(folder / RECORD, dump_json({"submitted": dt.datetime.now().isoformat(timespec="seconds"),
                                            "steps": cfg.tune.probe_steps, "searched": searched(cfg),
                                            "probes": record}))
    print(f"probes: {len(points)} runs of {cfg.tune.probe_steps} steps; when they finish, run the same "
          f"`trainctl tune` again to compare measured with predicted (progress: trainctl status {folder})")


# ---- what they measured ----------------------------------------------------------------------

def measure(run_dir: Path) -> dict | None:
    """Step time and peak memory a probe logged (module docstring); None before two windows are logged.
    Lines that are not a whole training record (one being written, a hand-edited file) are skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    records = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (isinstance(rec, dict) and rec.get("kind") == "train" and _positive(rec.get("step_time_s"))
                and _positive(rec.get("peak_memory_gib"))):
            records.append(rec)
    if len(records) < 2:
        return None
    times = [r["step_time_s"] for r in records[1:]]
    peak = max(r["peak_memory_gib"] for r in records)
    return {"step_time_s": statistics.median(times), "windows": len(times), "peak_memory_gib": peak,
            "memory_kind": records[-1].get("memory_kind")}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def collect(run_dir: Path, cfg) -> list[dict] | None:
    """Every probe of RUN_DIR with its prediction and, once it has logged enough, its measurement;
    None when no probes were submitted from this directory. Probes recorded for another search are an
    error: their predictions are not this search's."""
    path = probe_dir(run_dir) / RECORD
    if not path.is_file():
        return None
    fix = f"  fix: remove {probe_dir(run_dir)} (or tune under another name=...) to probe this search"
    try:
        record = json.loads(path.read_text())
        probes, then = record["probes"], record["searched"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a probe record trainctl can read ({exc})\n{fix}") from None
    now = searched(cfg)
    changed = {k: (then.get(k), v) for k, v in now.items() if then.get(k) != v}
    if changed:
        what = ", ".join(f"{k} {a} then, {b} now" for k, (a, b) in changed.items())
        raise UserError(f"{probe_dir(run_dir)}: these probes were run for another search ({what})\n{fix}")
    for p in probes:
        p["measured"] = measure(Path(p["run_dir"]))
    return probes


def _ratios(probes: list[dict]) -> tuple[float | None, float | None]:
    """Measured/predicted step time; measured GPU memory over the predicted tensors of the first stage
    (rank 0 logs ``max_memory_allocated``: tensors only, no CUDA context, NCCL buffers or fragmentation)."""
    done = [p for p in probes if p["measured"]]
    time = [p["measured"]["step_time_s"] / p["predicted"]["step_time_s"] for p in done]
    memory = [p["measured"]["peak_memory_gib"] / p["predicted"]["first_stage_tensors_gib"] for p in done
              if p["measured"]["memory_kind"] == "cuda_max_allocated"]
    return _geomean(time), _geomean(memory)


def _geomean(values: list[float]) -> float | None:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def calibration(cfg, probes: list[dict]) -> dict:
    """calibration.json: the geometric-mean measured/predicted ratios over the probes that finished."""
    time, memory = _ratios(probes)
    return {"cluster": cfg.cluster.name, "gpu": cfg.cluster.gpu.name, "model": cfg.model.name,
            "step_time_ratio": time, "memory_ratio": memory,
            "probes": [{"overrides": p["overrides"], "predicted": p["predicted"], "measured": p["measured"]}
                       for p in probes if p["measured"]],
            "written": dt.datetime.now().isoformat(timespec="seconds")}


def summary(probes: list[dict], cal: dict, path: Path) -> str:
    """Measured against predicted, probes re-ranked by measured step time."""
    done = sorted((p for p in probes if p["measured"]), key=lambda p: p["measured"]["step_time_s"])
    waiting = [p for p in probes if not p["measured"]]
    lines = [f"probes: {len(done)} of {len(probes)} measured, fastest measured first"]
    for new_rank, p in enumerate(done, start=1):
        m, pr = p["measured"], p["predicted"]
        if m["memory_kind"] == "cuda_max_allocated":
            mem = (f"rank 0 allocated {m['peak_memory_gib']:.2f} GiB vs {pr['first_stage_tensors_gib']:.2f} "
                   "predicted for the first stage's tensors")
        else:
            mem = f"peak RSS {m['peak_memory_gib']:.2f} GiB (a CPU run: not GPU memory, not compared)"
        lines.append(f"  {new_rank}. (tune #{p['rank']}) {m['step_time_s']:.3g} s/step measured vs "
                     f"{pr['step_time_s']:.3g} predicted (x{m['step_time_s'] / pr['step_time_s']:.2f}); {mem}; "
                     + " ".join(p["overrides"]))
    for p in waiting:
        lines.append(f"  tune #{p['rank']}: nothing measured yet ({p['run_dir']}; trainctl status {p['run_dir']})")
    if cal["step_time_ratio"] is not None:
        mem = (f"memory x{cal['memory_ratio']:.3f}" if cal["memory_ratio"] is not None
               else "memory not calibrated (no GPU memory was measured)")
        lines.append(f"calibration: step time x{cal['step_time_ratio']:.3f}, {mem}; apply it with "
                     f"cluster.calibration={path} (or set it in your cluster profile)")
    return "\n".join(lines)
