"""The plan as a person reads it in five seconds: fits? how fast? how long? how much?

Four headline rows answer those; three more give the layout, the memory split
and the run's risk figures. Every number comes from ``plan.json``.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from launch.config.schema import Scheduler
from launch.executors.requeue_limit import requeue_limit
from launch.fmt import si
from launch.verbs.plan import Plan


def _duration(days: float) -> str:
    seconds = days * 86400
    for size, unit in ((86400, "days"), (3600, "hours"), (60, "min")):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def _energy(mwh: float) -> str:
    return f"{mwh / 1000:.3g} GWh" if mwh >= 1000 else f"{mwh:.3g} MWh" if mwh >= 1 else f"{mwh * 1000:.3g} kWh"


def _calibrated(plan: Plan) -> str:
    """Says when cluster.calibration scaled the step time and memory (launch/estimate/calibration.py)."""
    cfg, cal = plan.cfg, plan.calibration
    if cal.path is None:
        return ""
    step = "" if cfg.estimate.mfu is not None else f"step time x{cal.step_time_ratio:.3g}"
    memory = cal.memory_ratio
    parts = [p for p in (step, f"memory x{memory:.3g}" if memory != 1.0 else "") if p]
    return f" ({', '.join(parts)} by cluster.calibration)" if parts else ""


def _requeues(plan: Plan) -> str:
    """The job script's requeue limit (launch/executors/requeue_limit.py), on a SLURM profile."""
    if plan.cfg.cluster.scheduler != Scheduler.slurm:
        return ""
    return f", requeued at most {requeue_limit(plan.cfg, plan.numbers['run'])} times"


def plan_table(plan: Plan) -> Table:
    cfg, d, n = plan.cfg, plan.derived, plan.numbers
    mem, thr, run, par = n["memory_gib"], n["throughput"], n["run"], n["parallel"]
    params = si(n["model"]["params_total"]) + (f" ({si(n['model']['params_active'])} active)"
                                               if cfg.model.num_experts else "")
    title = (f"[bold]{cfg.name}[/bold]: {cfg.model.name} {params} params, {cfg.stage.kind.name}, "
             f"{cfg.backend.name.name}, {cfg.cluster.nodes} x {cfg.cluster.gpus_per_node} {cfg.cluster.gpu.name}")
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 1))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")

    verdict = "[green]fits[/green]" if mem["fits"] else "[bold red]DOES NOT FIT[/bold red]"
    table.add_row("fits?", f"{verdict}: {mem['per_gpu_peak']:.1f} of {mem['hbm']:.1f} GiB per GPU "
                  f"(heaviest of {len(d.stage_layers)} pipeline stage(s))")
    table.add_row("how fast?", f"{thr['step_time_s']:.3g} s/step, {si(thr['tokens_per_s_per_gpu'])} tokens/s/GPU, "
                  f"{thr['tflops_per_gpu']:.0f} TFLOP/s/GPU, MFU {100 * thr['mfu']:.1f}%" + _calibrated(plan))
    table.add_row("how long?", f"{_duration(run['wall_clock_days'])}: {run['steps']:,} steps of {si(d.tokens_per_step)} "
                  f"tokens = {si(run['tokens'])} tokens, {run['jobs_needed']} job(s) of {cfg.cluster.time_limit}"
                  + _requeues(plan))
    co2 = f", {run['co2_tonnes']:.3g} t CO2" if run.get("co2_tonnes") else ""
    table.add_row("how much?", f"{si(run['gpu_hours'])} GPU-hours, ${run['cost_usd']:,.0f}, "
                  f"{_energy(run['energy_mwh'])}{co2}")
    table.add_row("", "")
    vpp = f" (vpp {par['vpp']})" if par["vpp"] > 1 else ""
    ep = f", ep {par['ep']}" if par["ep"] > 1 else ""
    table.add_row("layout", f"tp {par['tp']} x pp {par['pp']}{vpp} x cp {par['cp']} x dp {par['dp']} = "
                  f"{d.world_size} GPUs{ep}; layers per stage {_stages(d.stage_layers)}; sequence parallel "
                  f"{'on' if d.sequence_parallel else 'off'}; recompute {cfg.parallel.recompute.name}")
    table.add_row("batch", f"{par['global_batch_size']} sequences = micro {par['micro_batch_size']} x accum "
                  f"{par['grad_accum_steps']} x dp {par['dp']}, {cfg.model.seq_length} tokens each")
    table.add_row("memory", f"weights {mem['weights']:.1f}, grads {mem['grads']:.1f}, optimizer "
                  f"{mem['optimizer']:.1f}, activations {mem['activations']:.1f} GiB"
                  + (f"; per stage {_stages([round(x, 1) for x in n['memory_stages_gib']])}"
                     if len(n.get("memory_stages_gib", ())) > 1 else ""))
    mtbf = f", one every {run['mtbf_cluster_min']:.0f} min" if run.get("mtbf_cluster_min") else ""
    table.add_row("risk", f"{run['expected_failures']:.3g} expected failures{mtbf}; checkpoint every "
                  f"{_duration(run['checkpoint_interval_min'] / 1440)}")
    table.add_row("scaling", f"{n['scaling']['tokens_per_param']:.3g} tokens/param, predicted loss "
                  f"{n['scaling']['predicted_loss']:.3f}")
    return table


def _stages(values) -> str:
    values = list(values)
    if len(set(values)) == 1:
        return f"{len(values)} x {values[0]}"
    return " ".join(str(v) for v in values)


def print_plan(plan: Plan, console: Console | None = None) -> None:
    (console or Console()).print(plan_table(plan))
