"""``trainctl VERB [overrides] [-m]``: the verb table, and a Hydra app per verb.

Each verb that takes a config runs as a ``hydra.main`` app, so overrides,
``-m`` (multirun: one run directory per point), ``--cfg job --resolve`` and
``--help`` behave as in any Hydra app. Hydra is told to raise instead of print
(HYDRA_FULL_ERROR) so that every user error leaves here as one message per
problem and exit code 2, with no traceback.

Nothing here imports torch, deepspeed or megatron: this runs on login nodes.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from launch.errors import EXIT_USER_ERROR, UserError

USAGE = """\
usage: trainctl VERB [overrides] [-m] [--cfg job --resolve] [--help]
       trainctl --version

Compose a training run from config groups, check it, estimate it, and write its
launch artifacts into its run directory (runs/NAME).

verbs:
{verbs}

stages: pretrain, sft and dpo train on both backends; rlhf (GRPO, RLOO) on deepspeed.

config groups (group=option; `trainctl plan --help` shows every key):
{groups}

Examples:
  trainctl plan recipe=llama3_70b_pretrain_h100
  trainctl plan recipe=llama3_70b_pretrain_h100 parallel.tp=8 cluster.nodes=32
  trainctl plan --cfg job --resolve recipe=tiny_local
  trainctl plan -m recipe=llama3_8b_pretrain_h100 parallel.tp=1,2,4
  trainctl submit recipe=tiny_slurm          (sbatch; prints the job id and RUN_DIR at once)
  trainctl status runs/tiny_slurm
  trainctl tune recipe=llama3_70b_pretrain_h100 cluster.nodes=16
  trainctl plan --help          (config groups and their options)
"""


@dataclass(frozen=True)
class Verb:
    summary: str
    run: Callable[[object, Path, list[str]], None] | None
    """(composed config, run directory, the command line) -> None; raises UserError."""
    config_name: str = "config"
    """The verb's primary config in conf/ (``size`` has its own)."""
    setup: Callable[[], None] | None = None
    """Registers the verb's own schema before Hydra composes (besides launch.config.source.register)."""
    schema: Callable[[], type] | None = None
    """The verb's config dataclass, for error messages; None means trainctl's Config."""
    direct: Callable[[list[str]], int] | None = None
    """A verb that takes paths, not a config: called with its arguments instead of Hydra."""


def _plan(composed, run_dir: Path, command: list[str]) -> None:
    _write(composed, run_dir, command, with_job_script=False)


def _render(composed, run_dir: Path, command: list[str]) -> None:
    _write(composed, run_dir, command, with_job_script=True)


def _submit(composed, run_dir: Path, command: list[str]) -> None:
    from hydra.core.hydra_config import HydraConfig

    from launch.record.lock import hold
    from launch.verbs.submit import check_submittable, submit_written

    # One writer: RUN_DIR/.lock is held from the first check to sbatch's answer (on cluster=local, for the
    # life of the run); a second submit of this run is refused at once, naming this one.
    with hold(run_dir, "trainctl submit") as lock_fd:
        written = _write(composed, run_dir, command, with_job_script=True, check=check_submittable)
        hc = HydraConfig.get()
        sweep_dir = Path(hc.sweep.dir).absolute() if hc.mode.name == "MULTIRUN" else None
        submit_written(written, run_dir, sweep_dir, lock_fd)


def _write(composed, run_dir: Path, command: list[str], **kwargs):
    from hydra.core.hydra_config import HydraConfig

    from launch.verbs.records import write_records

    return write_records(composed, run_dir, command, list(HydraConfig.get().overrides.task), **kwargs)


def _status(args: list[str]) -> int:
    from launch.verbs.status import status_main

    return status_main(args)


def _cancel(args: list[str]) -> int:
    from launch.verbs.status import cancel_main

    return cancel_main(args)


def _size(composed, run_dir: Path, command: list[str]) -> None:
    from launch.verbs.size import run_size

    run_size(composed, run_dir, command)


def _prepare(composed, run_dir: Path, command: list[str]) -> None:
    from launch.data.command import run_prepare

    run_prepare(composed, run_dir, command)


def _tune(composed, run_dir: Path, command: list[str]) -> None:
    from launch.verbs.tune_run import run_tune

    run_tune(composed, run_dir, command)


def _size_schema() -> type:
    from launch.verbs.size_schema import SizeConfig

    return SizeConfig


def _size_setup() -> None:
    from launch.verbs.size_schema import register

    register()


VERBS: dict[str, Verb] = {
    "plan": Verb("compose, validate, estimate; print the plan; write RUN_DIR/{config,overrides}.yaml, plan.json, meta.json", _plan),
    "render": Verb("plan + the backend's files (ds_config.json | megatron.yaml, megatron_args.txt), plan.png and "
                   "the job script (job.sbatch on SLURM, launch.sh on cluster=local)", _render),
    "submit": Verb("render + sbatch the job script; returns at once with the job id and RUN_DIR "
                   "(submit.preflight=true: ask Slurm with --test-only, queue nothing); on cluster=local, "
                   "trains here in the foreground", _submit),
    "status": Verb("state of submitted runs, sweeps and pipelines: Slurm's view, requeues, crashes, last step "
                   "and loss (trainctl status [RUN_DIR ...])", None, direct=_status),
    "cancel": Verb("cancel the pending or running jobs of a run, sweep or pipeline (trainctl cancel RUN_DIR); "
                   "a local run stops at a checkpoint",
                   None, direct=_cancel),
    "prepare": Verb("tokenize the data mixture's sources into indexed shards (data.prepared_dir); "
                    "skips finished ones; reports tokens and epochs per source", _prepare),
    "tune": Verb("search parallel layouts (tp, pp, vpp, cp, ep, micro batch, recompute, optimizer sharding) with "
                 "the estimator; print the top tune.top_k; write RUN_DIR/tune.json and the best as "
                 "RUN_DIR/conf/parallel/NAME_tuned.yaml (tune.probe=true: also submit the top K as short runs)", _tune),
    "size": Verb("scaling-law sizing and run cost from params+tokens or a FLOP budget; write RUN_DIR/size.json",
                 _size, config_name="size", setup=_size_setup, schema=_size_schema),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[0:1] in (["--version"], ["-V"]):
        return _quietly(lambda: print(_version()) or 0)
    if not argv or argv[0] in ("-h", "--help", "help"):
        try:
            return _quietly(lambda: print(_usage()) or 0)
        except UserError as exc:  # TRAINCTL_CONFIG_PATH names what is not a directory
            _error("\n".join(exc.problems))
            return EXIT_USER_ERROR
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        near = difflib.get_close_matches(verb, VERBS, n=1)
        hint = f"did you mean 'trainctl {near[0]}'? " if near else ""
        _error(f"unknown verb {verb!r}\n  fix: {hint}verbs: {', '.join(VERBS)}")
        return EXIT_USER_ERROR
    try:
        if VERBS[verb].direct is not None:
            return _quietly(lambda: _run_direct(verb, rest))
        return _quietly(lambda: _run_hydra_verb(verb, rest))
    except KeyboardInterrupt:  # Ctrl-C before a run started (a local run handles its own: executors/local.py)
        _error("interrupted (Ctrl-C)")
        return 130


def _quietly(run: Callable[[], int]) -> int:
    """``run()``, except that a reader who went away (``| head``) ends it quietly, as Python's docs advise."""
    try:
        return run()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run_direct(verb: str, args: list[str]) -> int:
    if "--help" in args or "-h" in args:
        print(f"trainctl {verb}: {VERBS[verb].summary}")
        return 0
    try:
        return VERBS[verb].direct(args)
    except UserError as exc:
        _error("\n".join(exc.problems))
        return EXIT_USER_ERROR


ENGINES = ("hydra-core", "omegaconf", "torch", "deepspeed", "megatron-core", "transformers", "trl", "datasets",
           "wandb")
"""The packages a run depends on, as ``--version`` reports them (and a bug report should quote them)."""


def _version() -> str:
    """trainctl's version and the engines' found in this environment, read from their metadata (no import:
    a login node without the [train] extra says "not installed")."""
    import platform
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"
    width = max(map(len, ENGINES))
    return "\n".join([f"trainctl {version('trainctl')} (Python {platform.python_version()})",
                      *(f"  {name:<{width}}  {version(name)}" for name in ENGINES)])


def _usage() -> str:
    from launch.config.source import group_options

    width = max(map(len, VERBS))
    verbs = "\n".join(f"  {name:<{width}}  {v.summary}" for name, v in VERBS.items())
    groups = "\n".join(f"  {group}: {', '.join(options)}" for group, options in group_options().items())
    return USAGE.format(verbs=verbs, groups=groups)


def _run_hydra_verb(verb: str, args: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from launch.config import hydra_callbacks
    from launch.config.hydra_errors import explain
    from launch.config.source import register

    register()
    if VERBS[verb].setup is not None:
        VERBS[verb].setup()
    failures: list[UserError] = []
    written: set[Path] = set()

    def task(composed) -> None:
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir).absolute()
        try:
            if run_dir in written:
                raise UserError(f"{run_dir}: another point of this sweep already wrote this run directory\n"
                                "  fix: give each point its own name, or keep hydra.sweep.subdir at its default")
            VERBS[verb].run(composed, run_dir, ["trainctl", verb, *args])
            written.add(run_dir)
        except UserError as exc:
            failures.append(exc)
            point = f" (point {hc.job.num}: {','.join(hc.overrides.task)})" if hc.mode.name == "MULTIRUN" else ""
            _error(f"{len(exc.problems)} problem(s) with this config{point}:\n" + "\n".join(exc.problems))

    if "--help" in args or "-h" in args:
        print(f"trainctl {verb}: {VERBS[verb].summary}\n")
    app = hydra.main(version_base="1.3", config_path=None, config_name=VERBS[verb].config_name)(task)
    saved = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [f"trainctl {verb}", *args]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing; reported below with exit 2
    try:
        with _one_composition(args):
            app()
    except UserError as exc:  # raised outside a point's task (the job-array launcher's submission)
        _error("\n".join(exc.problems))
        failures.append(exc)
    except Exception as exc:  # noqa: BLE001 - only Hydra's and OmegaConf's errors are user errors
        if isinstance(exc, BrokenPipeError):
            raise  # the reader went away (| head): main() ends quietly
        schema = VERBS[verb].schema
        message = explain(exc, schema()) if schema else explain(exc)
        if message is None:
            raise
        _error(message)
        failures.append(UserError(message))
    finally:
        sys.argv = saved[0]
        if saved[1] is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved[1]
        if written:
            hydra_callbacks.forget()
        else:
            hydra_callbacks.cleanup()
    return EXIT_USER_ERROR if failures else 0


@contextlib.contextmanager
def _one_composition(args: list[str]):
    """Compose the config once per run instead of twice.

    ``hydra.main`` (hydra-core 1.3, ``_run_hydra``) first composes the whole config
    only to read ``hydra.mode`` (``Hydra.get_mode``), then composes it again to run;
    for trainctl's config that first pass is ~40% of ``trainctl plan``'s time
    (benchmarks/cli_latency.py). trainctl's configs never set ``hydra.mode``: the
    mode is ``-m``/``--multirun`` on the command line, which Hydra reads without the
    probe (a None mode means RUN, or MULTIRUN with ``-m``). An explicit
    ``hydra.mode=`` override keeps Hydra's own probe.
    """
    from hydra._internal.hydra import Hydra

    from launch.compat import HYDRA_MODE_PROBE, require

    if any(a.startswith("hydra.mode=") for a in args):
        yield
        return
    require(HYDRA_MODE_PROBE)  # a private Hydra method: checked, with the versions it was tested on
    probe = Hydra.get_mode
    Hydra.get_mode = lambda self, config_name, overrides: None
    try:
        yield
    finally:
        Hydra.get_mode = probe


def _error(message: str) -> None:
    print(f"trainctl: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
