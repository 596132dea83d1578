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
    _stage_rows(table, plan)
    loss = n["scaling"]["predicted_loss"]
    table.add_row("scaling", f"{n['scaling']['tokens_per_param']:.3g} tokens/param"
                  + (f", predicted loss {loss:.3f}" if loss is not None else
                     f" (no predicted loss: a pretraining scaling law says nothing about a {cfg.stage.kind.name} stage)"))
    return table


PART_NAMES = {"policy": "policy", "reference": "reference model", "reward_model": "reward model",
              "rollout_weights": "rollout weights", "kv_cache": "KV cache"}
PHASE_NAMES = {"generation": "generation", "weight_sync": "weight sync", "reference": "reference forward",
               "reward_model": "reward-model forward", "train": "policy training"}


def _stage_rows(table: Table, plan: Plan) -> None:
    """A DPO or RL stage's memory by owner and step time by phase (plan.json's ``stage`` block)."""
    cfg, stage = plan.cfg, plan.numbers.get("stage", {})
    if "train_gpus" not in stage:  # pretraining and SFT: the rows above say it all
        return
    step = plan.numbers["throughput"]["step_time_s"]
    memory = ", ".join(f"{PART_NAMES[k]} {v:.1f}" for k, v in stage["memory_gib"].items() if v)
    times = ", ".join(f"{PHASE_NAMES[k]} {v:.3g} s ({100 * v / step:.0f}%)" for k, v in stage["time_s"].items())
    if cfg.stage.kind.name == "dpo":
        pairs = cfg.train.global_batch_size
        table.add_row("stage", f"DPO: {pairs} pairs = {stage['sequences_per_step']} sequences (chosen + rejected) "
                      f"a step; the reference model frozen, weights only, sharded as the policy")
    else:
        s, r = cfg.stage, stage["rollout"]
        prompts = cfg.train.global_batch_size // max(s.num_generations, 1)
        where = (f"on {s.rollout.nodes} node(s) added to the {cfg.cluster.nodes} that train"
                 if r["gpu_peak_gib"] is not None else "in the training ranks")
        table.add_row("stage", f"{s.rl_algorithm.name.upper()}: {prompts} prompts x {s.num_generations} = "
                      f"{cfg.train.global_batch_size} completions of <= {s.max_completion_length} tokens a step; "
                      f"rollout {r['engine']} {where}; {r['waves']} wave(s) of {r['sequences_per_engine']:.3g} "
                      f"sequences per engine, {r['decode_step_ms']:.3g} ms per decode step (HBM-bound)")
        table.add_row("generating", f"{100 * stage['generation_share']:.0f}% of the step (generation + weight sync)")
    table.add_row("stage memory", f"{memory} GiB per training GPU"
                  + (f"; rollout GPUs {r['gpu_peak_gib']:.1f} GiB (vLLM's reservation: weights "
                     f"{r['weights_gib']:.1f}, KV cache {r['kv_cache_pool_gib']:.1f})"
                     if cfg.stage.kind.name == "rlhf" and r["gpu_peak_gib"] is not None else ""))
    table.add_row("step time", times)


def _stages(values) -> str:
    values = list(values)
    if len(set(values)) == 1:
        return f"{len(values)} x {values[0]}"
    return " ".join(str(v) for v in values)


def print_plan(plan: Plan, console: Console | None = None) -> None:
    (console or Console()).print(plan_table(plan))
