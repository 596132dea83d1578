"""``trainctl size``: how big, how long, how costly, from scaling laws and a few numbers.

Given params and tokens (N, D): the FLOPs (6ND), wall clock on ``gpus`` GPUs at
``mfu``, GPU-hours, dollars, energy, CO2, expected failures, the cluster's mean
time between failures and the Young/Daly checkpoint interval, and beside them the
compute-optimal N and D for the same FLOPs. Given only ``compute``: the
compute-optimal N and D (the fitted law, ``scaling_law``), which are then priced
the same way; Kaplan et al. 2020's allocation is shown for comparison. Given
``inference_tokens``: the inference-aware optimum, the model with the fewest
training + inference FLOPs that reaches the same loss (Sardana et al. 2024).

The arithmetic (seed 001, "Sizing the Undertaking"): wall clock = 6ND / (GPUs x
peak x MFU), failures = GPU-hours / per-GPU MTBF, one every MTBF / GPUs; the
formulas live in ``launch.estimate.run`` and ``launch.estimate.scaling``, shared
with ``trainctl plan``. Standard library, Hydra and rich only: no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.table import Table

from launch.config.schema import ClusterConfig
from launch.config.slurm_time import parse_time_limit
from launch.errors import UserError
from launch.fmt import si
from launch.estimate.run import Facility, run_costs
from launch.estimate.scaling import FITS, inference_optimal, kaplan_optimal, lifetime_flops
from launch.verbs.size_schema import SizeConfig
from launch.config.hydra_errors import extra_keys
from launch.record.write import dump_json, meta, write_run

CHECKPOINT_BYTES_PER_PARAM = 14
"""bf16 weights (2) + fp32 master weights, Adam m and v (12): launch.estimate.run.checkpoint_bytes for bf16."""


@dataclass(frozen=True)
class Hardware:
    """The GPU and facility numbers a size uses, after the profile filled the nulls."""

    gpu_name: str
    peak_tflops: float
    facility: Facility


# ---- pure: the numbers -----------------------------------------------------------------

def problems(cfg: SizeConfig) -> list[str]:
    """Every bad input at once, each naming the key, its value and a fix."""
    found = []
    for key in ("params", "tokens", "compute"):
        value = getattr(cfg, key)
        if value is not None and not (value > 0 and math.isfinite(value)):
            found.append(f"{key}={value:g}: must be a positive number\n  fix: e.g. {key}={_EXAMPLE[key]}, or leave it out")
    given = [k for k in ("params", "tokens", "compute") if getattr(cfg, k) is not None]
    if len(given) == 3:
        found.append(f"params={cfg.params:g}, tokens={cfg.tokens:g}, compute={cfg.compute:g}: give two of them, not three "
                     "(compute = 6 x params x tokens)\n  fix: drop one, e.g. remove compute=...")
    elif given in ([], ["params"], ["tokens"]):
        have = f"only {given[0]}={getattr(cfg, given[0]):g} is given" if given else "none is given"
        found.append(f"params, tokens, compute: {have}; a run needs two of them\n"
                     "  fix: give params=... and tokens=..., or compute=... (FLOPs) for the compute-optimal split, "
                     "e.g. trainctl size params=70e9 tokens=15e12")
    if cfg.gpus < 1:
        found.append(f"gpus={cfg.gpus}: must be at least 1\n  fix: gpus=1024 (the GPUs the run is spread over)")
    if not 0 < cfg.mfu <= 1:
        found.append(f"mfu={cfg.mfu}: must be a fraction in (0, 1]\n  fix: mfu=0.4 (frontier runs reach 0.35-0.5)")
    if not (cfg.inference_tokens >= 0 and math.isfinite(cfg.inference_tokens)):
        found.append(f"inference_tokens={cfg.inference_tokens}: must be 0 or more\n  fix: inference_tokens=1e13, or 0")
    for key in ("mtbf_hours", "checkpoint_write_gbps", "peak_tflops", "pue"):
        value = getattr(cfg, key)
        if value is not None and not value > 0:
            found.append(f"{key}={value}: must be positive\n  fix: leave it out to take the gpu profile's value")
    for key in ("checkpoint_write_s", "usd_per_gpu_hour", "power_w", "node_overhead_w", "grid_kgco2_per_kwh"):
        value = getattr(cfg, key)
        if value is not None and not value >= 0:
            found.append(f"{key}={value}: must be 0 or more\n  fix: leave it out to take the gpu profile's value")
    if cfg.time_limit is not None:
        try:
            if not parse_time_limit(cfg.time_limit) > 0:
                raise ValueError("not positive")
        except ValueError:
            found.append(f"time_limit={cfg.time_limit!r}: not a positive SLURM time limit\n"
                         "  fix: time_limit=04:00:00 or 2-00:00:00 (D-HH:MM:SS), or leave it out")
    return found


_EXAMPLE = {"params": "70e9", "tokens": "15e12", "compute": "6.3e24"}


def hardware(cfg: SizeConfig, profile: ClusterConfig) -> Hardware:
    """The profile's numbers, each replaced by the size config's value where that is set."""
    def pick(value, default):
        return default if value is None else value

    limit = pick(cfg.time_limit, profile.time_limit)
    try:
        limit_s = parse_time_limit(limit)
    except ValueError:
        limit_s = 0.0
    if not limit_s > 0:
        raise UserError(f"time_limit={limit!r} (from the cluster profile gpu={cfg.gpu}): not a positive SLURM time "
                        "limit\n  fix: time_limit=04:00:00, or correct the profile's time_limit")
    # The profile's facility, then the size keys that are set (size's names -> Facility's).
    given = {"usd_per_gpu_hour": cfg.usd_per_gpu_hour, "gpu_power_w": cfg.power_w,
             "node_overhead_w": cfg.node_overhead_w, "pue": cfg.pue, "grid_kgco2_per_kwh": cfg.grid_kgco2_per_kwh,
             "gpu_mtbf_hours": cfg.mtbf_hours, "checkpoint_write_gbps": cfg.checkpoint_write_gbps}
    facility = dataclasses.replace(Facility.of(dataclasses.replace(profile, time_limit=limit)),
                                   **{key: value for key, value in given.items() if value is not None})
    return Hardware(gpu_name=profile.gpu.name, peak_tflops=pick(cfg.peak_tflops, profile.gpu.peak_bf16_tflops),
                    facility=facility)


def run_shape(cfg: SizeConfig) -> tuple[float, float, str]:
    """(N, D, how): the run that is priced, from the two of params, tokens, compute that are given."""
    fit = FITS[cfg.scaling_law]
    if cfg.params is not None and cfg.tokens is not None:
        return cfg.params, cfg.tokens, "given"
    if cfg.params is not None:
        return cfg.params, cfg.compute / (6 * cfg.params), "tokens = compute / 6N"
    if cfg.tokens is not None:
        return cfg.compute / (6 * cfg.tokens), cfg.tokens, "params = compute / 6D"
    n, d = fit.compute_optimal(cfg.compute)
    return n, d, f"compute-optimal ({cfg.scaling_law.name})"


def size_numbers(cfg: SizeConfig, hw: Hardware) -> dict:
    """The size.json content. ``cfg`` must have passed ``problems``."""
    fit = FITS[cfg.scaling_law]
    n, d, how = run_shape(cfg)
    flops = 6 * n * d
    wall_s = flops / (cfg.gpus * hw.peak_tflops * 1e12 * cfg.mfu)
    write_s = cfg.checkpoint_write_s
    if write_s is None:
        write_s = n * CHECKPOINT_BYTES_PER_PARAM / (hw.facility.checkpoint_write_gbps * 1e9)
    n_opt, d_opt = fit.compute_optimal(flops)
    n_kaplan, d_kaplan = kaplan_optimal(flops)
    loss = fit.loss(n, d)
    numbers = {
        "params": n,
        "tokens": d,
        "sized_by": how,
        "flops": flops,
        "gpus": cfg.gpus,
        "gpu": hw.gpu_name,
        "peak_tflops": hw.peak_tflops,
        "mfu": cfg.mfu,
        **run_costs(wall_s, cfg.gpus, hw.facility, write_s),
        "checkpoint_write_s": write_s,
        "facility": {k: (v if math.isfinite(v) else None) for k, v in asdict(hw.facility).items()},
        "scaling_law": cfg.scaling_law.name,
        "tokens_per_param": d / n,
        "predicted_loss": loss,
        "optimal_params": n_opt,
        "optimal_tokens": d_opt,
        "optimal_loss": fit.loss(n_opt, d_opt),
        "kaplan_params": n_kaplan,
        "kaplan_tokens": d_kaplan,
        "inference_tokens": cfg.inference_tokens,
        "inference_optimal": None,
    }
    if cfg.inference_tokens > 0:
        n_inf, d_inf = inference_optimal(fit, loss, cfg.inference_tokens)
        n_ref = fit.params_for_loss(loss)
        d_ref = fit.tokens_to_reach(n_ref, loss)
        numbers["inference_optimal"] = {
            "params": n_inf,
            "tokens": d_inf,
            "training_flops": 6 * n_inf * d_inf,
            "lifetime_flops": lifetime_flops(n_inf, d_inf, cfg.inference_tokens),
            "compute_optimal_params": n_ref,
            "compute_optimal_tokens": d_ref,
            "compute_optimal_lifetime_flops": lifetime_flops(n_ref, d_ref, cfg.inference_tokens),
        }
    return numbers


# ---- the table --------------------------------------------------------------------------

def size_table(n: dict, name: str):
    table = Table(title=f"trainctl size: {name}", show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()

    def section(title: str) -> None:
        table.add_row(f"[bold]{title}[/bold]", "")

    section("run")
    table.add_row("params x tokens", f"{si(n['params'])} x {si(n['tokens'])} ({n['tokens_per_param']:.3g} tokens/param)")
    if n["sized_by"] != "given":
        table.add_row("sized by", n["sized_by"])
    table.add_row("compute (6ND)", f"{n['flops']:.3g} FLOPs")
    table.add_row("hardware", f"{n['gpus']:,} x {n['gpu']}, MFU {n['mfu']:.0%} of {n['peak_tflops']:g} TF/s")
    table.add_row("wall clock", f"{n['wall_clock_days']:.3g} days ({n['jobs_needed']:,} jobs)")
    table.add_row("GPU-hours / cost", f"{n['gpu_hours']:.3g} / ${n['cost_usd']:,.0f}")
    table.add_row("energy / CO2", f"{n['energy_mwh']:,.0f} MWh / {n['co2_tonnes']:,.0f} t")
    section("failures")
    table.add_row("expected failures", f"{n['expected_failures']:,.1f}, one every {n['mtbf_cluster_min']:,.0f} min")
    table.add_row("checkpoint (Young/Daly)", f"every {n['checkpoint_interval_min']:.3g} min, "
                  f"{n['checkpoint_write_s']:.3g} s to write")
    section(f"scaling ({n['scaling_law']})")
    table.add_row("predicted loss", f"{n['predicted_loss']:.3f}")
    table.add_row("compute-optimal", f"{si(n['optimal_params'])} params x {si(n['optimal_tokens'])} tokens, "
                  f"loss {n['optimal_loss']:.3f}")
    table.add_row("Kaplan 2020 (N ~ C^0.73)", f"{si(n['kaplan_params'])} params x {si(n['kaplan_tokens'])} tokens")
    inf = n["inference_optimal"]
    if inf:
        saving = 1 - inf["lifetime_flops"] / inf["compute_optimal_lifetime_flops"]
        table.add_row(f"inference-aware ({si(n['inference_tokens'])} served)",
                      f"{si(inf['params'])} params x {si(inf['tokens'])} tokens, same loss")
        table.add_row("  lifetime FLOPs", f"{inf['lifetime_flops']:.3g} vs {inf['compute_optimal_lifetime_flops']:.3g}"
                      f" for {si(inf['compute_optimal_params'])} (-{saving:.0%})")
    return table


# ---- the command ------------------------------------------------------------------------

def load_profile(name: str) -> ClusterConfig:
    """The cluster profile ``name`` as ``trainctl plan cluster=NAME`` would compose it.

    Composed with Hydra on the running app's search path (shipped profiles,
    TRAINCTL_CONFIG_PATH, hydra.searchpath), so a site profile that extends h100
    through its defaults list works here too.
    """
    overrides = [f"+cluster={name}"]
    if HydraConfig.initialized() and HydraConfig.get().searchpath:
        quoted = ("'" + p.replace("\\", "\\\\").replace("'", "\\'") + "'" for p in HydraConfig.get().searchpath)
        overrides.append(f"hydra.searchpath=[{','.join(quoted)}]")
    try:
        node = compose(overrides=overrides).cluster
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ClusterConfig), node))
    except MissingConfigException as exc:
        options = ", ".join(exc.options or [])
        raise UserError(f"gpu={name}: no cluster profile named {name!r} to take the GPU spec from\n"
                        f"  fix: gpu=<one of {options}>, or add cluster/{name}.yaml to a directory on "
                        "TRAINCTL_CONFIG_PATH") from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(f"gpu={name}: the cluster profile {name!r} does not load: {str(exc).splitlines()[0]}\n"
                        f"  fix: check cluster/{name}.yaml (trainctl plan cluster={name} --cfg job shows it)") from None


def make_size(composed) -> tuple[SizeConfig, dict]:
    """(typed config, size.json numbers) for a composed ``conf/size.yaml``; raises UserError."""
    extra = extra_keys(composed, SizeConfig)
    if extra:
        valid = ", ".join(SizeConfig.__dataclass_fields__)
        raise UserError([f"{key}: no such key in trainctl size's config\n  fix: valid keys: {valid}" for key in extra])
    cfg: SizeConfig = OmegaConf.to_object(composed)
    found = problems(cfg)
    if found:
        raise UserError(found)
    return cfg, size_numbers(cfg, hardware(cfg, load_profile(cfg.gpu)))


def run_size(composed, run_dir: Path, command: list[str]) -> None:
    """Size, print the table, write RUN_DIR/{config,overrides}.yaml, meta.json, size.json.

    A failure leaves a run directory this command created absent, as ``trainctl plan`` does.
    """
    fresh = not any(run_dir.iterdir()) if run_dir.is_dir() else True
    try:
        cfg, numbers = make_size(composed)
        overrides = list(HydraConfig.get().overrides.task)
        files = {
            "config.yaml": OmegaConf.to_yaml(composed, resolve=True),
            "overrides.yaml": "".join(f"- {json.dumps(o)}\n" for o in overrides) or "[]\n",
            "meta.json": dump_json(meta(command)),
            "size.json": dump_json(numbers),  # last: a size.json means the records are complete
        }
        (run_dir / "size.json").unlink(missing_ok=True)
        write_run(run_dir, files)
    except BaseException:
        if fresh:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    Console().print(size_table(numbers, cfg.name))
    print(f"wrote {run_dir}/: {', '.join(sorted(files))}")
