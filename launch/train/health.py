"""``python -m launch.train.health RUN_DIR``: each node checks itself before torchrun starts.

A node with a dead GPU, a down InfiniBand port or a full disk is otherwise found
by the first collective that hangs, minutes into a multi-day job, and the job is
requeued onto the same node. The job script (slurm/job.sbatch.j2) runs this once
per node as its own job step, in seconds and without torch, and then:

- every node healthy: one line per node (``health: NODE healthy: ...``), torchrun starts;
- a node unhealthy: its line says which check failed, measured against expected;
  it writes the ``node`` outcome record (``launch.record.outcome``, under the Slurm node
  name that exclusion needs) and exits ``EXIT_UNHEALTHY``; the script requeues the job
  without that node.

What is checked (each only where it can be: a check that cannot run says "not
checked" and never fails the node):

- GPUs, on a GPU profile (``preflight.cpu_devices`` is false): ``nvidia-smi``'s count
  against ``cluster.gpus_per_node``, uncorrectable volatile ECC errors, free memory
  against the plan's per-GPU peak, and hardware Xid errors of the last hour in the
  kernel log (``dmesg``, often unreadable by users).
- InfiniBand or RoCE ports (``cluster.network``): every port of that link layer under
  ``/sys/class/infiniband`` ACTIVE.
- Free space: one checkpoint (the plan's model size, ``launch.estimate.run.checkpoint_bytes``)
  on the checkpoint file system, a floor on the run directory's and the data cache's.
- ``TRAINCTL_FAULT_UNHEALTHY_NODES``: a test-only fault knob (README, "Test-only fault knobs").

The GPU and network checks were never run on real H100s or InfiniBand: their
parsing is tested on sample output (tests/test_health.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from launch.config.schema import Config, Network
from launch.errors import UserError
from launch.record import outcome
from launch.record.checkpoints import checkpoint_dir
from launch.record.outcome import Outcome
from launch.record.read import PlanNumbers, read_config, read_plan
from launch.train.preflight import EXIT_USER, cpu_devices

EXIT_UNHEALTHY = 5
"""This node failed a health check (the ``node`` outcome): the job is requeued without it."""
FAULT_KNOB = "TRAINCTL_FAULT_UNHEALTHY_NODES"
"""Test-only: a comma list of Slurm node names whose health check fails (off when unset)."""
GIB = 1024 ** 3
FLOOR_GIB = 1.0
"""Free space the run directory and the data cache need at least: logs, metrics, index files."""
MOST_OF_HBM = 0.9
"""Free memory each GPU needs at most, as a share of its total: a plan above HBM ran with estimate.allow_oom."""
XID_WINDOW_S = 3600
"""Xid errors older than this (seconds before now) are history, not this node's present state."""
NODE_XIDS = {48: "double-bit ECC error", 62: "internal micro-controller halt", 63: "ECC page retirement or row "
             "remapping", 64: "ECC page retirement or row remapper failure", 74: "NVLink error", 79: "GPU has "
             "fallen off the bus", 92: "high single-bit ECC error rate", 94: "contained ECC error", 95: "uncontained "
             "ECC error", 119: "GSP RPC timeout", 120: "GSP error", 140: "unrecovered ECC error"}
"""Xids that mean the GPU or its node needs a reset or service (NVIDIA's Xid catalog,
docs.nvidia.com/deploy/xid-errors). Application faults (13, 31, 43, 45) are a program's own
and do not count against the node."""
TOOL_TIMEOUT_S = 20.0
"""nvidia-smi on a hung GPU never answers: past this, the node is unhealthy."""
SMI_QUERY = "index,pci.bus_id,memory.total,memory.free,ecc.errors.uncorrected.volatile.total"


@dataclass(frozen=True)
class Finding:
    """One check's result on this node: ``ok`` False fails the node; None: not checked (said why)."""
    ok: bool | None
    text: str


# --- GPUs: nvidia-smi and the kernel log -----------------------------------------------------------

@dataclass(frozen=True)
class Gpu:
    index: int
    bus_id: str
    total_mib: float
    free_mib: float
    ecc_uncorrected: int | None
    """None where ECC is off or not reported ("[N/A]")."""


def parse_smi(text: str) -> list[Gpu]:
    """``nvidia-smi --query-gpu=SMI_QUERY --format=csv,noheader,nounits`` output, one GPU a line."""
    gpus = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5 or not fields[0].isdigit():
            continue
        index, bus, total, free, ecc = fields
        gpus.append(Gpu(int(index), bus, _number(total) or 0.0, _number(free) or 0.0,
                        int(_number(ecc)) if _number(ecc) is not None else None))
    return gpus


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def gpu_findings(gpus: list[Gpu], expected: int, need_gib: float) -> list[Finding]:
    """Count, ECC and free memory of ``nvidia-smi``'s GPUs against the profile and the plan."""
    found = [Finding(len(gpus) == expected, f"{len(gpus)} GPU(s) (expected cluster.gpus_per_node={expected})")]
    bad_ecc = [g for g in gpus if g.ecc_uncorrected]
    found.append(Finding(not bad_ecc, ", ".join(f"GPU {g.index} ({g.bus_id}): {g.ecc_uncorrected} uncorrectable "
                                                f"ECC error(s) (expected 0)" for g in bad_ecc)
                         or "no uncorrectable ECC errors"))
    low = []
    for g in gpus:
        need = min(need_gib, MOST_OF_HBM * g.total_mib / 1024)
        if g.free_mib / 1024 < need:
            low.append(f"GPU {g.index} ({g.bus_id}): {g.free_mib / 1024:.1f} GiB free of {g.total_mib / 1024:.1f} "
                       f"(expected >= {need:.1f}: the plan's per-GPU peak, at most {MOST_OF_HBM:.0%} of it)")
    found.append(Finding(not low, "; ".join(low) or f"free memory >= {need_gib:.1f} GiB (the plan's peak) "
                                                    "or most of each GPU's"))
    return found


def parse_xids(dmesg: str, now_s: float, window_s: float = XID_WINDOW_S) -> list[tuple[int, str]]:
    """(Xid, PCI address) of the node-fault Xids logged in the last ``window_s`` seconds.

    ``dmesg`` lines start with seconds since boot: ``[ 7632.123] NVRM: Xid (PCI:0000:18:00): 79, ...``;
    ``now_s`` is the same clock (/proc/uptime).
    """
    hits = []
    for m in re.finditer(r"^\[\s*(\d+(?:\.\d+)?)\].*?NVRM: Xid \(([^)]*)\): (\d+)", dmesg, re.MULTILINE):
        when, where, xid = float(m.group(1)), m.group(2), int(m.group(3))
        if xid in NODE_XIDS and now_s - when <= window_s:
            hits.append((xid, where))
    return hits


def xid_finding(run=subprocess.run, uptime: Path = Path("/proc/uptime")) -> Finding:
    """The kernel log's recent node-fault Xids; "not checked" where dmesg is not readable (most users)."""
    try:
        out = run(["dmesg"], capture_output=True, text=True, timeout=5)
        now = float(uptime.read_text().split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as exc:
        return Finding(None, f"Xid errors not checked (dmesg: {exc})")
    if out.returncode != 0:
        said = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        return Finding(None, f"Xid errors not checked (dmesg not readable: {said})")
    hits = parse_xids(out.stdout, now)
    if hits:
        return Finding(False, ", ".join(f"Xid {x} ({NODE_XIDS[x]}) on {where} in the last hour (expected none)"
                                        for x, where in hits))
    return Finding(True, "no Xid errors in the last hour")


def gpu_check(cfg: Config, plan: PlanNumbers, run=subprocess.run) -> list[Finding]:
    if cpu_devices(cfg):
        return [Finding(None, f"GPUs not checked (cluster.gpu.name={cfg.cluster.gpu.name}: CPU processes)")]
    smi = shutil.which("nvidia-smi")
    if smi is None:  # torch's own check on each rank still stops a GPU job without a device (exit 4)
        return [Finding(None, "GPUs not checked (nvidia-smi not found on PATH)")]
    try:
        out = run([smi, f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits"], capture_output=True,
                  text=True, timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [Finding(False, f"nvidia-smi did not answer within {TOOL_TIMEOUT_S:.0f} s (a hung GPU or driver)")]
    if out.returncode != 0:
        said = (out.stdout.strip() + "\n" + out.stderr.strip()).strip().splitlines() or ["no output"]
        return [Finding(False, f"nvidia-smi failed (exit {out.returncode}: {said[-1]})")]
    return [*gpu_findings(parse_smi(out.stdout), cfg.cluster.gpus_per_node, plan.memory_gib.per_gpu_peak),
            xid_finding(run)]


# --- the fabric -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Port:
    device: str
    port: str
    state: str
    """The word of ``state`` ("4: ACTIVE" -> ACTIVE)."""
    link_layer: str
    """InfiniBand or Ethernet (RoCE); empty where the file is missing."""


LINK_LAYER = {Network.infiniband: "InfiniBand", Network.roce: "Ethernet"}


def read_ports(root: Path = Path("/sys/class/infiniband")) -> list[Port]:
    """Every RDMA port under ``root/DEVICE/ports/N/``, with its state and link layer."""
    ports = []
    for state in sorted(root.glob("*/ports/*/state")):
        folder = state.parent
        try:
            word = state.read_text().split(":")[-1].strip()
            layer = (folder / "link_layer").read_text().strip() if (folder / "link_layer").exists() else ""
        except OSError as exc:
            word, layer = f"unreadable ({exc.strerror})", ""
        ports.append(Port(folder.parent.parent.name, folder.name, word, layer))
    return ports


def network_findings(network: Network, ports: list[Port]) -> list[Finding]:
    """InfiniBand/RoCE: every port of that link layer ACTIVE, and at least one."""
    layer = LINK_LAYER.get(network)
    if layer is None:
        return [Finding(None, f"network not checked (cluster.network={network.value}; only InfiniBand and "
                              "RoCE ports are checked)")]
    mine = [p for p in ports if p.link_layer in (layer, "")]
    if not mine:
        return [Finding(False, f"no {layer} port under /sys/class/infiniband (expected some: "
                               f"cluster.network={network.value})")]
    down = [p for p in mine if p.state != "ACTIVE"]
    if down:
        return [Finding(False, ", ".join(f"{p.device} port {p.port}: {p.state} (expected ACTIVE)" for p in down))]
    return [Finding(True, f"{len(mine)} {layer} port(s) ACTIVE")]


# --- free space -------------------------------------------------------------------------------------

def space_findings(needs: list[tuple[str, Path, float]], stat=shutil.disk_usage) -> list[Finding]:
    """Free space per file system: ``needs`` is (label, path, GiB needed); paths on one device add up.

    A path not yet created (the checkpoint directory before the first save) is measured at its
    nearest existing parent, where it will be created.
    """
    groups: dict[int, tuple[list[str], Path, float]] = {}
    for label, path, need in needs:
        where = _existing(path)
        key = os.stat(where).st_dev
        labels, first, total = groups.get(key, ([], where, 0.0))
        groups[key] = ([*labels, label], first, total + need)
    found = []
    for labels, where, need in groups.values():
        free = stat(where).free / GIB
        found.append(Finding(free >= need, f"{', '.join(labels)} ({where}): {free:.1f} GiB free "
                                           f"(expected >= {need:.1f})"))
    return found


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def space_needs(cfg: Config, plan: PlanNumbers, run_dir: Path) -> list[tuple[str, Path, float]]:
    from launch.estimate.run import checkpoint_bytes  # the plan's own figure for one checkpoint

    ckpt_gib = checkpoint_bytes(cfg, plan.model.params_total) / GIB
    return [("run dir", run_dir, FLOOR_GIB),
            ("data cache", run_dir / "data_cache", FLOOR_GIB),  # launch/train/loop.py, megatron_args.txt
            ("checkpoints", checkpoint_dir(cfg, run_dir), ckpt_gib)]


# --- the node -----------------------------------------------------------------------------------------

def fault_knob(node: str, env=os.environ) -> list[Finding]:
    listed = [n.strip() for n in env.get(FAULT_KNOB, "").split(",") if n.strip()]
    if node in listed:
        return [Finding(False, f"{node} is listed in {FAULT_KNOB}={','.join(listed)} (test-only fault knob)")]
    return []


def check(cfg: Config, plan: PlanNumbers, run_dir: Path, node: str, env=os.environ) -> list[Finding]:
    return [*fault_knob(node, env), *gpu_check(cfg, plan),
            *network_findings(cfg.cluster.network, read_ports()),
            *space_findings(space_needs(cfg, plan, run_dir))]


def main(argv: list[str], env=os.environ) -> int:
    if len(argv) != 1:
        print("usage: python -m launch.train.health RUN_DIR", file=sys.stderr)
        return EXIT_USER
    run_dir, node = Path(argv[0]).absolute(), outcome.node_name(env)
    try:
        record, plan = read_config(run_dir), read_plan(run_dir)
    except UserError as exc:  # a damaged record: the trainer would stop on it the same way
        cause = "\n".join(exc.problems)
        outcome.write(run_dir, Outcome.config, cause, env=env)
        print(f"health: {node}: {outcome.first_line(cause)}", flush=True)
        return EXIT_USER
    findings = check(record.cfg, plan, run_dir, node, env)
    failed = [f.text for f in findings if f.ok is False]
    if failed:
        outcome.write(run_dir, Outcome.node, f"health check: {'; '.join(failed)}", env=env)
        print(f"health: {node} UNHEALTHY: {'; '.join(failed)}", flush=True)
        return EXIT_UNHEALTHY
    print(f"health: {node} healthy: {'; '.join(f.text for f in findings)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
