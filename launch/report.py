"""The plan as a person reads it: a rich table of layout, memory, speed and cost."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from launch.plan import Plan


def _si(x: float, unit: str = "") -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def plan_table(plan: Plan) -> Table:
    cfg, d, n = plan.cfg, plan.derived, plan.numbers
    mem, thr, run, par = n["memory_gib"], n["throughput"], n["run"], n["parallel"]
    table = Table(title=f"trainctl plan: {cfg.name}", show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()

    def section(name: str) -> None:
        table.add_row(f"[bold]{name}[/bold]", "", end_section=False)

    section("job")
    table.add_row("model", f"{cfg.model.name}  {_si(n['model']['params_total'])} params"
                  + (f" ({_si(n['model']['params_active'])} active)" if cfg.model.num_experts else ""))
    table.add_row("stage / backend", f"{cfg.stage.kind.name} / {cfg.backend.name.name}")
    table.add_row("cluster", f"{cfg.cluster.name}: {cfg.cluster.nodes} nodes x {cfg.cluster.gpus_per_node}"
                  f" = {d.world_size} {cfg.cluster.gpu.name}")
    section("layout (derived)")
    table.add_row("tp x pp x cp x dp", f"{par['tp']} x {par['pp']} x {par['cp']} x {par['dp']}"
                  + (f"   vpp {par['vpp']}" if par["vpp"] > 1 else "") + (f"   ep {par['ep']}" if par["ep"] > 1 else ""))
    table.add_row("pipeline stages", _stages(d.stage_layers))
    table.add_row("batch", f"{par['global_batch_size']} seq = {par['micro_batch_size']} micro x "
                  f"{par['grad_accum_steps']} accum x {par['dp']} dp;  {_si(d.tokens_per_step)} tokens/step")
    table.add_row("sequence parallel / recompute", f"{d.sequence_parallel} / {cfg.parallel.recompute.name}")
    section("memory per GPU (heaviest stage)")
    fits = "[green]fits[/green]" if mem["fits"] else "[bold red]does not fit[/bold red]"
    table.add_row("peak", f"{mem['per_gpu_peak']:.1f} of {mem['hbm']:.1f} GiB  {fits}")
    table.add_row("weights / grads / optimizer", f"{mem['weights']:.1f} / {mem['grads']:.1f} / {mem['optimizer']:.1f} GiB")
    table.add_row("activations", f"{mem['activations']:.1f} GiB")
    section("speed")
    table.add_row("step time", f"{thr['step_time_s']:.3g} s   {_si(thr['tokens_per_s_per_gpu'])} tokens/s/GPU")
    table.add_row("TFLOP/s per GPU / MFU", f"{thr['tflops_per_gpu']:.0f} / {100 * thr['mfu']:.1f}%")
    section("run")
    table.add_row("tokens / steps", f"{_si(run['tokens'])} / {run['steps']:,}")
    table.add_row("wall clock", f"{run['wall_clock_days']:.3g} days in {run['jobs_needed']} jobs of {cfg.cluster.time_limit}")
    table.add_row("GPU-hours / cost", f"{_si(run['gpu_hours'])} / ${run['cost_usd']:,.0f}")
    table.add_row("energy / expected failures", f"{run['energy_mwh']:.3g} MWh / {run['expected_failures']:.3g}")
    table.add_row("checkpoint every", f"{run['checkpoint_interval_min']:.0f} min")
    table.add_row("tokens per param / predicted loss",
                  f"{n['scaling']['tokens_per_param']:.3g} / {n['scaling']['predicted_loss']:.3f}")
    return table


def _stages(layers: tuple[int, ...]) -> str:
    if len(set(layers)) == 1:
        return f"{len(layers)} x {layers[0]} layers"
    return " ".join(str(n) for n in layers) + " layers"


def print_plan(plan: Plan, console: Console | None = None) -> None:
    (console or Console()).print(plan_table(plan))
