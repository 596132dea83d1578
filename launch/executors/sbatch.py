"""The sbatch script of a run: the config -> the values of ``slurm/job.sbatch.j2``.

One renderer for every SLURM job trainctl writes (a run, a pipeline stage, a
job array of sweep points). The template holds the shell; this module decides
the values, each shell-quoted by the template's ``q`` filter or here, so no
config string can run a command (tests/test_sbatch.py runs a rendered script
with ``$(touch pwned)`` in every field).

The ``#SBATCH`` lines are sorted: two scripts diff cleanly.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from launch.config.schema import BackendName, Config
from launch.config.slurm_time import parse_time_limit
from launch.errors import UserError
from launch.paths import asset_dir, project_root
from launch.estimate.run import checkpoint_write_seconds
from launch.executors import container, rollout
from launch.executors.network import network_env
from launch.executors.requeue_limit import requeue_limit
from launch.record.checkpoints import checkpoint_dir

TEMPLATE = "job.sbatch.j2"
PREPARE_TEMPLATE = "prepare.sbatch.j2"
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""Signals torchrun forwards to its ranks (its default set plus SIGUSR1, the time-limit warning)."""
EXPORT_ALL = "--export=ALL"
"""Every srun step gets the batch script's environment (its exports: NCCL, MASTER_ADDR...). Without it, a job
submitted with ``--export=NAMES`` (cluster.export_env) passes that list on to srun in SLURM_EXPORT_ENV, and the
step starts without PATH or anything the script exported (seen on Slurm 22.05: ``execve(): bash: No such file``)."""
SIGNAL_GRANULARITY_S = 60
"""Slurm checks --signal timers about once a minute, so the signal may come up to 60 s late."""


def signal_lead_seconds(cfg: Config, numbers: dict) -> int:
    """Seconds before the time limit that the job gets SIGUSR1.

    At the limit Slurm sends SIGTERM and then SIGKILL after KillWait (30 s by
    default): too little to write a large checkpoint. So the warning comes
    early enough to finish the current step and write one checkpoint twice over
    (the estimate is from ``cluster.checkpoint_write_gbps``, which sites
    overrate), plus Slurm's timer granularity.
    """
    if cfg.cluster.signal_lead_s is not None:
        return cfg.cluster.signal_lead_s
    write_s = checkpoint_write_seconds(cfg, numbers["model"]["params_total"])
    return math.ceil(numbers["throughput"]["step_time_s"] + 2 * write_s) + SIGNAL_GRANULARITY_S


def directives(cfg: Config, run_dir: Path, lead_s: int, *, dependency: str | None = None,
               array: str | None = None, log_dir: Path | None = None) -> list[str]:
    """The ``#SBATCH`` lines' options, sorted; values quoted as sbatch reads them."""
    c = cfg.cluster
    log = f"{log_dir or run_dir}/slurm-%A_%a.log" if array else f"{run_dir}/slurm-%j.log"
    opts: dict[str, str | None] = {
        "job-name": cfg.name,
        "nodes": str(c.nodes + rollout.server_nodes(cfg)),  # the vLLM server's nodes come after the training ones
        "ntasks-per-node": "1",
        "gpus-per-node": str(c.gpus_per_node),
        "time": c.time_limit,
        "output": log,
        "error": log,
        "open-mode": "append",  # a requeued job appends to its log instead of truncating it
        "signal": f"B:USR1@{lead_s}",
        "requeue": None,
    }
    return _format(c, opts, dependency=dependency, array=array)


def prepare_directives(cfg: Config, run_dir: Path, tasks: int) -> list[str]:
    """``#SBATCH`` options of ``trainctl prepare``'s job array: one CPU task per shard, no GPUs."""
    c = cfg.cluster
    log = f"{run_dir}/prepare-%A_%a.log"
    opts: dict[str, str | None] = {"job-name": f"{cfg.name}-prepare", "nodes": "1", "ntasks": "1",
                                   "time": c.time_limit, "output": log, "error": log, "open-mode": "append",
                                   "requeue": None}
    return _format(c, opts, array=f"0-{tasks - 1}")


def _format(c, opts: dict[str, str | None], *, dependency: str | None = None, array: str | None = None) -> list[str]:
    """Add the cluster profile's options to ``opts``; sorted ``--key=value`` strings, values quoted."""
    optional = {"partition": c.partition, "account": c.account, "qos": c.qos, "mem": c.mem,
                "cpus-per-task": None if c.cpus_per_node is None else str(c.cpus_per_node),
                "dependency": dependency, "array": array,
                "export": None if c.export_env is None else ",".join(c.export_env) or "NONE"}
    opts.update({k: v for k, v in optional.items() if v is not None})
    if c.exclusive:
        opts["exclusive"] = None
    for key, value in c.directives.items():
        opts[key.lstrip("-")] = value or None
    bad = {k: v for k, v in opts.items() if "\n" in k or (v is not None and ("\n" in v or "\r" in v))}
    if bad:
        key = next(iter(bad))
        raise UserError(f"#SBATCH --{key}: the value {bad[key]!r} has a line break, which would end the "
                        f"#SBATCH line\n  fix: remove the line break from the config value")
    return [f"--{k}" if v is None else f"--{k}={shlex.quote(v)}" for k, v in sorted(opts.items())]


def resources(cfg: Config) -> dict:
    """What a job asks Slurm for: points of one job array must agree on all of it."""
    c = cfg.cluster
    return {"cluster.nodes": c.nodes, "cluster.gpus_per_node": c.gpus_per_node, "cluster.time_limit": c.time_limit,
            "cluster.partition": c.partition, "cluster.account": c.account, "cluster.qos": c.qos,
            "cluster.mem": c.mem, "cluster.cpus_per_node": c.cpus_per_node, "cluster.exclusive": c.exclusive,
            "cluster.container_image": c.container_image, "cluster.directives": dict(c.directives),
            "cluster.python": c.python, "cluster.setup": list(c.setup), "cluster.env": dict(c.env),
            "cluster.export_env": None if c.export_env is None else list(c.export_env), "cluster.network": c.network.name,
            "cluster.mpi": c.mpi.name, "stage.rollout.engine": cfg.stage.rollout.engine.name,
            "stage.rollout.nodes": rollout.server_nodes(cfg), "stage.rollout.tensor_parallel": cfg.stage.rollout.tensor_parallel,
            "stage.rollout.port": cfg.stage.rollout.port, "stage.rollout.server_timeout_s": cfg.stage.rollout.server_timeout_s}


def job_env(cfg: Config) -> list[tuple[str, str]]:
    """Environment the job exports: trainctl's defaults, cluster.network's, then cluster.env over them."""
    env: dict[str, str] = {}
    if cfg.backend.name == BackendName.megatron:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"  # Megatron's TP comm overlap needs kernels issued in order
    if cfg.cluster.cpus_per_node:
        env["OMP_NUM_THREADS"] = str(max(1, cfg.cluster.cpus_per_node // cfg.cluster.gpus_per_node))
    env.update(network_env(cfg.cluster.network))
    env.update(cfg.cluster.env)
    return sorted(env.items())


def srun_prefix(c, container_options: list[str], *, nodes: int | None = None, nodelist: str | None = None) -> list[str]:
    """The srun options every per-node job step shares: one task on each of the job's nodes, its CPUs, the image.

    The health check and the training step run under the same prefix, so the check
    sees the nodes, CPUs, GPUs and image (with its mounts) that torchrun will.
    ``container_options``: from ``container_options`` (empty on bare metal). ``nodes``: the step's node
    count (default ``cluster.nodes``); ``nodelist``: which of the job's nodes (a script variable), where a
    vLLM server shares the allocation (launch/executors/rollout.py).
    """
    where = [f"--nodelist={nodelist}"] if nodelist else []
    return ["srun", f"--mpi={c.mpi.name}", f"--nodes={nodes or c.nodes}", *where, "--ntasks-per-node=1",
            *_cpus_per_task(c), EXPORT_ALL, *container_options]


def srun_line(cfg: Config, lead_s: int, container_options: list[str], run_dir_var: str = '"$RUN_DIR"') -> str:
    """``srun ... python -m launch.train.launcher ... -m launch.train "$RUN_DIR"``, quoted.

    The launcher is torchrun, run in-process (``launch.train.launcher``): after a stop signal it
    forwards (USR1 before the time limit, TERM at preemption) it exits quietly instead of with
    torchrun's traceback, which would read like a crash in a job's log where the ranks saved and
    stopped as asked. ``--kill-on-bad-exit``: a node whose torchrun fails ends the others' at once
    instead of leaving them in a collective that never completes.
    """
    c = cfg.cluster
    nodelist = "$TRAIN_NODES" if rollout.server_nodes(cfg) else None
    srun = [*srun_prefix(c, container_options, nodelist=nodelist), "--kill-on-bad-exit=1"]
    torchrun = [c.python, "-m", "launch.train.launcher", f"--nnodes={c.nodes}", f"--nproc-per-node={c.gpus_per_node}"]
    rdzv = ["--rdzv-backend=c10d", "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT", "--rdzv-id=$JOB_REF",
            "--max-restarts=0"]
    stop = [f"--signals-to-handle={TORCHRUN_SIGNALS}", f"--shutdown-timeout={lead_s}"]
    lines = [srun, torchrun, rdzv, stop, ["-m", "launch.train"]]
    text = " \\\n    ".join(" ".join(_quote_keeping_vars(w) for w in words) for words in lines)
    return f"{text} {run_dir_var}"


def health_values(cfg: Config, container_options: list[str]) -> dict:
    """The template's values for the node health step (``launch.train.health``) and what follows it.

    No ``--kill-on-bad-exit``: the check takes seconds, and every node's line is worth
    having. ``no_trainctl_cause``: the configuration error the script records when the
    step could not even import trainctl (the image or interpreter lacks it).
    ``site_excluded``: the submission's own ``--exclude`` (``cluster.directives.exclude``), which
    the script's ``scontrol update ExcNodeList`` would otherwise replace.
    """
    c = cfg.cluster
    every_node = c.nodes + rollout.server_nodes(cfg)  # the vLLM server's nodes are checked too
    words = [*srun_prefix(c, container_options, nodes=every_node), c.python, "-m", "launch.train.health"]
    line = " ".join(_quote_keeping_vars(w) for w in words) + ' "$RUN_DIR"'
    if c.container_image:
        cause = (f"cluster.python {c.python} in image {c.container_image} cannot import trainctl: build the image "
                 "from slurm/Containerfile or install trainctl[train] there")
    else:
        cause = (f"cluster.python {c.python} on the nodes cannot import trainctl"
                 f"{' after cluster.setup' if c.setup else ''}: install trainctl[train] into it, or point "
                 "cluster.python (and cluster.setup) at an interpreter that has it")
    return {"health_line": line, "no_trainctl_cause": cause, "max_excluded_nodes": c.max_excluded_nodes,
            "site_excluded": c.directives.get("exclude") or ""}


def container_options(cfgs: list[Config], run_dirs: list[Path], checkpoint_dirs: list[Path]) -> list[str]:
    """srun's pyxis options for these runs: ``--container-image``, and ``--container-mounts`` of every path
    their configs name (launch/executors/container.py). Empty on bare metal.

    Relative config paths are the submitting directory's: this process's.
    """
    c = cfgs[0].cluster
    if not c.container_image:
        return []
    return [f"--container-image={c.container_image}",
            *container.srun_options(cfgs, run_dirs, checkpoint_dirs, cwd=Path.cwd(), code=project_root())]


def _cpus_per_task(c) -> list[str]:
    """srun's ``--cpus-per-task`` for the one task per node: every CPU the job holds there.

    srun does not inherit it from sbatch (Slurm 22.05+), and without it a step's
    task may get the site's default of 1 CPU, which starves torchrun's ranks and
    their data loaders. ``cluster.cpus_per_node`` when set (also an #SBATCH line);
    else, on an ``--exclusive`` node, ``$SLURM_CPUS_ON_NODE`` at run time: the
    batch step's CPUs on its node, all of them when the node is exclusive, so no
    count has to be guessed for the site's nodes (which must then be alike).
    """
    if c.cpus_per_node:
        return [f"--cpus-per-task={c.cpus_per_node}"]
    if c.exclusive:
        return ["--cpus-per-task=$SLURM_CPUS_ON_NODE"]
    return []


def _quote_keeping_vars(word: str) -> str:
    """shlex.quote, except that the script's own variables ($RUN_DIR, $MASTER_ADDR...) still expand.

    Only trainctl's fixed variable names are let through: a ``$`` inside a config
    value stays inside single quotes.
    """
    parts = []
    for piece in _split_vars(word):
        parts.append(f'"{piece}"' if piece.startswith("$") else shlex.quote(piece) if piece else "")
    return "".join(parts)


_SCRIPT_VARS = ("$RUN_DIR", "$MASTER_ADDR", "$MASTER_PORT", "$JOB_REF", "$SLURM_CPUS_ON_NODE", "$TRAIN_NODES",
                "$ROLLOUT_NODES", "$ROLLOUT_MODEL")


def _split_vars(word: str) -> list[str]:
    out, rest = [], word
    while rest:
        hits = [(rest.find(v), v) for v in _SCRIPT_VARS if rest.find(v) >= 0]
        if not hits:
            out.append(rest)
            break
        at, var = min(hits)
        out += [rest[:at], var]
        rest = rest[at + len(var):]
    return out


def rollout_values(cfg: Config, container_options: list[str], models: list[str | None]) -> dict | None:
    """The template's values for the vLLM server step (launch/executors/rollout.py), or None without one."""
    if not rollout.server_nodes(cfg):
        return None
    words = [*srun_prefix(cfg.cluster, container_options, nodes=rollout.server_nodes(cfg), nodelist="$ROLLOUT_NODES"),
             *rollout.server_command(cfg)]
    line = " ".join(_quote_keeping_vars(w) for w in words)
    return rollout.template_values(cfg, line, [m or "" for m in models])


def render_sbatch(cfg: Config, run_dir: Path, numbers: dict, *, dependency: str | None = None) -> str:
    """The text of RUN_DIR/job.sbatch for this run."""
    lead = signal_lead_seconds(cfg, numbers)
    limit = parse_time_limit(cfg.cluster.time_limit)
    if limit is not None and lead >= limit / 2:
        raise UserError(f"cluster.time_limit: {cfg.cluster.time_limit!r} leaves too little time: the stop "
                        f"signal must come {lead} s before the limit (one step and two checkpoint writes)\n"
                        "  fix: a longer cluster.time_limit, or cluster.signal_lead_s=SECONDS if you know better")
    options = container_options([cfg], [run_dir], [checkpoint_dir(cfg, run_dir)])
    return _template().render(
        directives=directives(cfg, run_dir, lead, dependency=dependency),
        run_dir=str(run_dir), array_run_dirs=None, gpus_per_node=cfg.cluster.gpus_per_node,
        signal_lead_s=lead, max_requeues=requeue_limit(cfg, numbers["run"]),
        max_crash_requeues=cfg.cluster.max_crash_requeues, env=job_env(cfg), setup=cfg.cluster.setup,
        rdzv_port=cfg.cluster.rdzv_port, srun_line=srun_line(cfg, lead, options), **health_values(cfg, options),
        checkpoint_dir=str(checkpoint_dir(cfg, run_dir)), array_checkpoint_dirs=None,
        rollout=rollout_values(cfg, options, [cfg.stage.init_checkpoint]))


def render_array(cfg: Config, run_dirs: list[Path], sweep_dir: Path, numbers: list[dict],
                 checkpoint_dirs: list[Path], cfgs: list[Config] | None = None) -> str:
    """One sbatch script that runs every point of a sweep as a job-array task (same resources each).

    ``numbers``: each point's plan, in ``run_dirs``' order. The stop signal's lead is the first
    point's; the requeue limit is the largest point's (every task shares MAX_REQUEUES).
    ``checkpoint_dirs``: each point's own (``train.checkpoint_dir`` may differ by point); the crash budget reads
    its ``latest``. ``cfgs``: each point's config (default: ``cfg`` alone); the container mounts
    cover what every point names.
    """
    lead = signal_lead_seconds(cfg, numbers[0])
    options = container_options(cfgs or [cfg], run_dirs, checkpoint_dirs)
    return _template().render(
        directives=directives(cfg, sweep_dir, lead, array=f"0-{len(run_dirs) - 1}", log_dir=sweep_dir),
        run_dir=None, array_run_dirs=[str(d) for d in run_dirs], gpus_per_node=cfg.cluster.gpus_per_node,
        signal_lead_s=lead, max_requeues=max(requeue_limit(cfg, n["run"]) for n in numbers),
        max_crash_requeues=cfg.cluster.max_crash_requeues, env=job_env(cfg), setup=cfg.cluster.setup,
        rdzv_port=cfg.cluster.rdzv_port, srun_line=srun_line(cfg, lead, options), **health_values(cfg, options),
        checkpoint_dir=None, array_checkpoint_dirs=[str(d) for d in checkpoint_dirs],
        rollout=rollout_values(cfg, options, [c.stage.init_checkpoint for c in cfgs or [cfg] * len(run_dirs)]))


def render_prepare(cfg: Config, run_dir: Path, sources: list[str]) -> str:
    """RUN_DIR/prepare.sbatch: a job array whose task i tokenizes ``sources[i]`` (``launch.data.array``)."""
    c = cfg.cluster
    srun = ["srun", f"--mpi={c.mpi.name}", "--ntasks=1", *_cpus_per_task(c), EXPORT_ALL,
            *container_options([cfg], [run_dir], [])]
    words = [*srun, c.python, "-m", "launch.data.array"]
    line = " ".join(_quote_keeping_vars(w) for w in words) + ' "$RUN_DIR" "$SOURCE"'
    return _template(PREPARE_TEMPLATE).render(
        directives=prepare_directives(cfg, run_dir, len(sources)), run_dir=str(run_dir), sources=sources,
        env=[(k, v) for k, v in job_env(cfg) if k != "CUDA_DEVICE_MAX_CONNECTIONS"], setup=c.setup, srun_line=line)


def _template(name: str = TEMPLATE):
    # Here, not at the top: `trainctl plan` imports this module but renders no script, and jinja2
    # would add ~35 ms (a tenth) to every plan.
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(asset_dir("slurm"))),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = lambda value: shlex.quote(str(value))
    return env.get_template(name)
