"""The ``trainctl tune`` verb: search (launch/verbs/tune.py), print the top K, write tune.json and the winner.

Writes into RUN_DIR (runs/NAME, as ``plan`` does) without touching a plan's records:

    tune.json                      the search: best, why, every candidate (launch.verbs.tune.tune_record)
    conf/parallel/LAYOUT.yaml      the best layout as a parallel/ option (LAYOUT: tune.layout_name)

``TRAINCTL_CONFIG_PATH=RUN_DIR/conf trainctl plan ... parallel=LAYOUT`` selects it;
so does copying it into your own config directory's ``parallel/``.
With ``tune.probe=true`` the top K also go to the cluster as short runs (launch/verbs/probe.py);
``trainctl tune`` with the same overrides afterwards reads what they measured.
"""

from __future__ import annotations

import datetime as dt
import re
import shlex
from collections import Counter
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from launch.paths import asset_dir
from launch.errors import UserError
from launch.fmt import si
from launch.verbs.plan import typed_config
from launch.record.write import dump_json, write_file
from launch.verbs.tune import (NEAR_TIE, Candidate, Search, layout_keys, overrides, rejected_by, roomier, search,
                         tune_record, why_best)
from launch.verbs import probe

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def run_tune(composed, run_dir: Path, command: list[str]) -> None:
    cfg = typed_config(composed)
    name = _layout_name(cfg)
    if cfg.tune.probe:  # tune.* ranges: launch.config.schema.BOUNDS, checked as search() validates the config
        probe.check_probeable(cfg)
    found = search(cfg)
    if not found.ranked:
        raise UserError(_nothing_fits(found))
    measured = probe.collect(run_dir, cfg)
    console = Console()
    console.print(top_table(found))
    for line in _verdict(found):
        console.print(line, highlight=False, soft_wrap=True)
    record = tune_record(found)
    files = {"tune.json": dump_json(record), f"conf/parallel/{name}.yaml": layout_yaml(found, name)}
    if measured:
        calibration = probe.calibration(cfg, measured)
        record["probes"] = measured
        files["tune.json"] = dump_json(record)
        if calibration["step_time_ratio"] is not None:
            files["calibration.json"] = dump_json(calibration)
        console.print(probe.summary(measured, calibration, run_dir / "calibration.json"), highlight=False, soft_wrap=True)
    _write_files(run_dir, files)
    console.print(f"wrote {run_dir}/: {', '.join(files)}", highlight=False, soft_wrap=True)
    console.print(f"use it: TRAINCTL_CONFIG_PATH={shlex.quote(_shown(run_dir / 'conf'))} trainctl plan "
                  + " ".join(map(shlex.quote, [*_user_overrides(), f"parallel={name}"])), highlight=False,
                  soft_wrap=True)
    if cfg.tune.probe and not measured:
        probe.submit(composed, found, run_dir)


def _layout_name(cfg) -> str:
    """tune.layout_name, or NAME_tuned; it becomes a file name and a parallel= option."""
    key, value = ("tune.layout_name", cfg.tune.layout_name) if cfg.tune.layout_name else ("name", cfg.name)
    name = cfg.tune.layout_name or f"{cfg.name}_tuned"
    if not _SAFE.match(name):
        raise UserError(f"{key}={value}: tune writes the best layout as parallel/{name}.yaml, a file name and a "
                        "parallel= option: letters, digits, '.', '_' or '-'\n  fix: tune.layout_name=my_layout")
    if (asset_dir("conf") / "parallel" / f"{name}.yaml").exists():
        raise UserError(f"{key}={value}: parallel={name} is a shipped option, which the tuned layout would hide "
                        "wherever it is on the search path\n  fix: tune.layout_name=my_layout")
    return name


def _user_overrides() -> list[str]:
    """This run's (this sweep point's) overrides, less the ones the tuned layout replaces."""
    task = list(HydraConfig.get().overrides.task)
    return [a for a in task if not a.lstrip("+~").startswith(("tune.", "parallel", "hydra."))]


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---- what is printed ------------------------------------------------------------------------

def top_table(found: Search) -> Table:
    cfg = found.cfg
    c = cfg.cluster
    title = (f"[bold]{cfg.name}[/bold]: {cfg.model.name} on {c.nodes} x {c.gpus_per_node} {c.gpu.name}, "
             f"seq {cfg.model.seq_length}, global batch {cfg.train.global_batch_size}, {cfg.backend.name.name}: "
             f"{len(found.ranked) + len(found.rejected):,} layouts in {found.seconds:.1f} s, "
             f"{len(found.ranked):,} fit in {c.gpu.hbm_gib:.1f} GiB")
    table = Table(title=title, title_justify="left", box=None, padding=(0, 1))
    for col in ("#", "layout", "recompute", "GiB", "s/step", "TFLOP/s", "MFU"):
        table.add_column(col, justify="left" if col in ("layout", "recompute") else "right", no_wrap=True)
    for rank, cand in enumerate(found.ranked[:cfg.tune.top_k], start=1):
        table.add_row(*_row(cfg, str(rank), cand))
    rank = _rank(found, found.current)
    if rank is None or rank > cfg.tune.top_k:
        table.add_row(*_row(cfg, "yours", found.current))
    return table


def _rank(found: Search, cand: Candidate) -> int | None:
    return next((i + 1 for i, c in enumerate(found.ranked) if c is cand), None)


def layout_text(c: Candidate, backend) -> str:
    """tp8 pp16 vpp8 cp1 mbs1 emb+loss: the shape of a layout in one cell (the optimizer when not the default:
    Megatron's distributed optimizer, or the ZeRO stage on DeepSpeed)."""
    p = c.parallel
    keys = layout_keys(c, backend)
    parts = [f"tp{p.tp}", f"pp{p.pp}"] + ([f"vpp{p.vpp}"] if p.vpp > 1 else []) + [f"cp{p.cp}"]
    parts += ([f"ep{p.ep}"] if p.ep > 1 else []) + [f"mbs{p.micro_batch_size}"]
    if p.account_for_embedding_in_pipeline_split or p.account_for_loss_in_pipeline_split:
        parts.append("+".join(n for n, on in (("emb", p.account_for_embedding_in_pipeline_split),
                                               ("loss", p.account_for_loss_in_pipeline_split)) if on))
    elif p.num_layers_in_first_pipeline_stage is not None:
        parts.append(f"first/last {p.num_layers_in_first_pipeline_stage}/{p.num_layers_in_last_pipeline_stage}")
    if keys.get("distributed_optimizer") is False:
        parts.append("no-dist-opt")
    if "zero_stage" in keys:
        parts.append(f"ZeRO-{keys['zero_stage']}")
    return " ".join(parts)


def _row(cfg, label: str, c: Candidate) -> list[str]:
    head = [label, layout_text(c, cfg.backend.name), c.parallel.recompute.name]
    if c.throughput is None:
        return head + [f"{c.memory['per_gpu_peak']:.1f}" if c.memory else "-", "rejected", "", ""]
    t = c.throughput
    return head + [f"{c.memory['per_gpu_peak']:.1f}", f"{t['step_time_s']:.3g}", f"{t['tflops_per_gpu']:.0f}",
                   f"{100 * t['mfu']:.0f}%"]


def _verdict(found: Search) -> list[str]:
    cfg, best = found.cfg, found.ranked[0]
    causes = list(rejected_by(found).items())
    lines = [f"rejected {len(found.rejected):,}: " + "; ".join(f"{key} {n:,}" for key, n in causes[:4])
             + ("; ..." if len(causes) > 4 else "")] if causes else []
    if len(found.ranked) > 1:
        why = why_best(cfg, best, found.ranked[1], found.calibration)
        lines.append(f"why #1: {why[0]}")
        lines += [f"  {line}" for line in why[1:]]
    alt = roomier(found)
    if alt is not None:
        lines.append(f"near tie: #{_rank(found, alt)} is within {100 * (alt.step_s / best.step_s - 1):.1f}% of #1 "
                     f"(under {100 * NEAR_TIE:.0f}%, closer than the estimate can tell) and needs "
                     f"{alt.memory['per_gpu_peak']:.1f} instead of {best.memory['per_gpu_peak']:.1f} GiB per GPU; "
                     "for the headroom: " + " ".join(overrides(alt, cfg.backend.name)))
    cur = found.current
    if cur is best:
        lines.append("your layout is the best one found")
    elif cur.rejected:
        lines.append(f"your layout is rejected: {cur.rejected}")
    else:
        slower = cur.step_s / best.step_s - 1
        rank = _rank(found, cur)
        place = (f"ranks #{rank}" if rank is not None else  # a key tune does not vary (etp, sequence_parallel, ...)
                 f"(outside the searched set) would rank #{sum(c.step_s < cur.step_s for c in found.ranked) + 1}")
        lines.append(f"your layout {place}: {100 * slower:.1f}% slower per step than #1 "
                     f"({si(cur.throughput['tokens_per_s_per_gpu'])} vs {si(best.throughput['tokens_per_s_per_gpu'])}"
                     " tokens/s/GPU)")
    lines.append("best layout: " + " ".join(overrides(best, cfg.backend.name)))
    return lines


def _nothing_fits(found: Search) -> list[str]:
    """No layout fits: what rejected them (by cause, then the commonest exact reasons) and what to change."""
    causes = "; ".join(f"{key} {n:,}" for key, n in list(rejected_by(found).items())[:4])
    reasons = Counter(c.rejected.split(";")[0] for c in found.rejected)
    top = "\n".join(f"    {n} x {reason}" for reason, n in reasons.most_common(3))
    c = found.cfg.cluster
    return [f"cluster.nodes={c.nodes}: none of the {len(found.rejected):,} layouts of {found.cfg.model.name} on "
            f"{c.nodes} x {c.gpus_per_node} GPUs is valid and fits; rejected by {causes}; for example:\n{top}\n"
            "  fix: by memory: more nodes (cluster.nodes=...) or a shorter model.seq_length; by the batch "
            "arithmetic: a train.global_batch_size that more data-parallel sizes divide (or fewer nodes)"]


# ---- what is written ---------------------------------------------------------------------------

def layout_yaml(found: Search, name: str) -> str:
    """The best layout as a complete parallel/ option: every key, so nothing comes from another option."""
    cfg, best = found.cfg, found.ranked[0]
    t, c = best.throughput, cfg.cluster
    lines = [f"# {name}: found by `trainctl tune` on {dt.date.today().isoformat()} for {cfg.model.name} on "
             f"{c.nodes} x {c.gpus_per_node} {c.gpu.name},",
             f"# seq {cfg.model.seq_length}, global batch {cfg.train.global_batch_size}, {cfg.backend.name.name}. "
             f"Predicted: {best.memory['per_gpu_peak']:.1f} GiB per GPU,",
             f"# {t['step_time_s']:.3g} s/step, {t['tflops_per_gpu']:.0f} TFLOP/s/GPU, MFU {100 * t['mfu']:.1f}% "
             "(tune.json beside conf/ has the runners-up)."]
    return "\n".join(lines) + "\n" + OmegaConf.to_yaml(OmegaConf.structured(best.parallel))


def _write_files(run_dir: Path, files: dict[str, str]) -> None:
    """Each file written whole; other files in RUN_DIR (a plan's records) are left alone."""
    for rel, text in files.items():
        write_file(run_dir / rel, text)
