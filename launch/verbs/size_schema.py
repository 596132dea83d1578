"""Typed schema of ``trainctl size`` (primary config ``conf/size.yaml``).

A flat set of numbers, not a training config: a run is described by two of
params, tokens and compute, the hardware by a GPU count and a cluster profile
(``gpu=h100`` reads ``conf/cluster/h100.yaml``, or a site's own profile of that
name on TRAINCTL_CONFIG_PATH). Every hardware figure left null is taken from
that profile; setting it overrides the profile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore

from launch.config.schema import ScalingLaw


@dataclass
class SizeConfig:
    name: str = "size"
    """The run directory: runs/NAME (re-running the same name lands in the same directory)."""
    params: Optional[float] = None
    """N: model parameters (active ones for MoE)."""
    tokens: Optional[float] = None
    """D: training tokens."""
    compute: Optional[float] = None
    """C: training FLOPs. Give two of params, tokens, compute; compute alone gives the compute-optimal N and D."""
    gpus: int = 1024
    """GPUs the run is spread over."""
    gpu: str = "h100"
    """Cluster profile (conf/cluster/NAME.yaml) whose gpu block, prices and power fill the nulls below."""
    mfu: float = 0.4
    """Model FLOPs utilisation against the dense BF16 peak (frontier runs: 0.35-0.5)."""
    scaling_law: ScalingLaw = ScalingLaw.chinchilla
    """Loss fit for the predicted loss and the optimal allocation (chinchilla | besiroglu)."""
    inference_tokens: float = 0.0
    """Tokens the model will serve in its lifetime; > 0 adds the inference-aware optimum (Sardana et al. 2024)."""
    mtbf_hours: Optional[float] = None
    """Mean hours between job-interrupting failures per GPU; null: the profile's gpu.mtbf_hours."""
    checkpoint_write_s: Optional[float] = None
    """Seconds to write one checkpoint; null: 14 B/param (bf16 weights + fp32 Adam state) / checkpoint_write_gbps."""
    checkpoint_write_gbps: Optional[float] = None
    """Aggregate write bandwidth to checkpoint storage, GB/s; null: the profile's."""
    peak_tflops: Optional[float] = None
    """Dense BF16 peak per GPU, TFLOP/s; null: the profile's gpu.peak_bf16_tflops."""
    usd_per_gpu_hour: Optional[float] = None
    """Price of a GPU-hour; null: the profile's."""
    power_w: Optional[float] = None
    """GPU board power at full load, W; null: the profile's gpu.power_w."""
    node_overhead_w: Optional[float] = None
    """Power per GPU beyond the board (CPUs, NICs, fans), W; null: the profile's."""
    pue: Optional[float] = None
    """Data-centre power usage effectiveness; null: the profile's."""
    grid_kgco2_per_kwh: Optional[float] = None
    """Carbon intensity of the electricity, kg CO2 per kWh; null: the profile's."""
    time_limit: Optional[str] = None
    """Per-job wall-clock limit (HH:MM:SS or D-HH:MM:SS) for jobs_needed; null: the profile's."""


def register() -> None:
    """Store the schema as ``size_schema``, the first entry of ``conf/size.yaml``'s defaults."""
    ConfigStore.instance().store(name="size_schema", node=SizeConfig)
