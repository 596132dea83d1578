"""``train.rank_check_s > 0``: check an allocation instead of training.

Every rank joins the process group (on GPUs NCCL for CUDA tensors and gloo for the
CPU flag of ``stop.agree``; gloo on CPUs), checks that the world is the size the
plan expects, measures the all-reduce bus bandwidth inside every node and across
the nodes (``measure``: milliseconds of traffic on H100s), and then all-reduces
once a second for ``rank_check_s`` seconds, stopping early, on every rank
together, when a stop signal arrives. It exercises what a training job needs
before its first step: the rendezvous, the collective backend, the links, the
signal path of the sbatch script.

**Bus bandwidth** is NCCL-tests' figure
(https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md): for an
all-reduce of S bytes over n ranks taking t seconds, algbw = S/t and busbw =
algbw x 2(n-1)/n, which "reflects the speed of the hardware bottleneck" and is
compared with the per-GPU, one-direction link figure whatever n is. Rank 0
prints one line per node and one for the whole allocation, then names the
slowest node against the expected figure (``expected``): inside a node,
``cluster.gpu.nvlink_gbps`` (450 GB/s on H100 SXM: NVLink 4's 900 GB/s counts
both directions, and busbw counts one); across nodes, the node's NICs, each GPU's
``cluster.gpu.ib_gbps`` times ``gpus_per_node`` (8 x 50 GB/s = 400 GB/s for
NDR 400 Gb/s), never above NVLink. On a cpu profile the figures are fake: the
measured ones are printed with no comparison.

**A slow node fails the check.** A node whose figure is below
``train.rank_check_min_busbw_gbps`` (default half of NVLink's, 225 GB/s on H100;
healthy H100 SXM nodes are reported at ~360-480 GB/s for large all-reduces, the
higher with NVLink SHARP) is named in a warning line, and the slowest such node
ends the job with the ``node`` outcome (exit 4, as a node without a usable GPU):
a node whose NVLink runs at a fraction of its speed slows every tensor-parallel
collective of a multi-day run, and the job script can requeue without it, which
a warning in a log nobody reads cannot. Its ranks return ``EXIT_SLOW_NODE`` and
write the record (so the record's node is that node); every other rank returns
``EXIT_OTHER_NODE`` and writes nothing, so no "done" from rank 0 races it. One
node per job: a second slow node is named too and found again by the next job's
check. The figure across nodes only warns: one all-reduce over every rank cannot
say which node or switch is slow, and a requeue onto the same fabric would not
change it. A stop signal that arrives during the measurement wins: the check
stops (scancel must not turn into a requeue because a node looked slow).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from launch.config.schema import Config, GPUSpec
from launch.record.read import PlanNumbers
from launch.train import preflight, stop

GB = 1e9
"""NCCL-tests' GB/s are 1e9 bytes per second (and so are NVIDIA's NVLink and the profile's figures)."""
GPU_BUFFER_BYTES = 256 * 2**20
"""256 MiB: at ~360 GB/s busbw over 8 ranks one round takes ~1.3 ms, against tens of microseconds of
latency, so the figure is the links' bandwidth, and 13 rounds take milliseconds."""
CPU_BUFFER_BYTES = 4 * 2**20
"""gloo on a cpu profile: the figures are fake anyway; keep the tests fast."""
WARMUP_ROUNDS = 3
"""Untimed: the first one also builds the NCCL communicator."""
TIMED_ROUNDS = 10
FLOOR_SHARE = 0.5
"""Default floor: a node below half its expected figure fails (train.rank_check_min_busbw_gbps=null);
across nodes, a warning below this share."""
EXIT_SLOW_NODE = preflight.EXIT_NO_DEVICE
"""This node is the slowest below the floor: the same outcome as a node without a usable GPU (``node``)."""
EXIT_OTHER_NODE = 5
"""Another node failed the check; that node's ranks write the outcome record, this rank none."""


# --- the arithmetic (pure) ----------------------------------------------------------------------

def bus_bandwidth_gbs(nbytes: int, seconds: float, ranks: int) -> float:
    """All-reduce bus bandwidth in GB/s: algbw = S/t, busbw = algbw x 2(n-1)/n (NCCL-tests, PERFORMANCE.md)."""
    if ranks < 2 or not seconds > 0:
        raise ValueError(f"bus bandwidth needs at least 2 ranks and a positive time (ranks={ranks}, "
                         f"seconds={seconds})")
    return nbytes / seconds / GB * 2 * (ranks - 1) / ranks


@dataclass(frozen=True)
class Expected:
    """What a healthy allocation's all-reduce bus bandwidth is compared with, GB/s."""

    node_gbs: float | None
    """Inside a node: NVLink per GPU per direction; None on a cpu profile (no figure to compare)."""
    across_gbs: float | None
    """Across nodes: the node's NICs, at most NVLink; None on a cpu profile."""
    floor_gbs: float
    """A node below this fails the check; 0: none."""


def expected(gpu: GPUSpec, gpus_per_node: int, cpu: bool, min_busbw_gbs: float | None) -> Expected:
    """The figures of ``cluster.gpu`` the measurement is held against (see the module's docstring).

    Across nodes NCCL runs one ring or tree per NIC, so with a NIC per GPU every rank's share of the
    traffic leaves the node through all of them at once: the node's NIC total, ``gpus_per_node x
    ib_gbps``, bounds busbw (a derivation from the definition above, not a measured figure).
    """
    node = None if cpu else gpu.nvlink_gbps
    across = None if cpu else min(gpus_per_node * gpu.ib_gbps, gpu.nvlink_gbps)
    if min_busbw_gbs is not None:
        floor = min_busbw_gbs
    else:
        floor = FLOOR_SHARE * node if node is not None else 0.0
    return Expected(node, across, floor)


@dataclass(frozen=True)
class Node:
    """The ranks torchrun started on one node (its ``GROUP_RANK``)."""

    label: str
    """SLURMD_NODENAME or the host name; ``name#index`` where names repeat (several agents on one host)."""
    ranks: tuple[int, ...]


def nodes_of(placements: list[tuple[int, str]]) -> list[Node]:
    """Group ranks by node from each rank's (node index, node name), in node-index order."""
    names: dict[int, str] = {}
    ranks: dict[int, list[int]] = {}
    for rank, (index, name) in enumerate(placements):
        names.setdefault(index, name)
        ranks.setdefault(index, []).append(rank)
    repeated = len(set(names.values())) < len(names)
    return [Node(f"{names[i]}#{i}" if repeated else names[i], tuple(ranks[i])) for i in sorted(names)]


@dataclass(frozen=True)
class Figure:
    where: str
    ranks: tuple[int, ...]
    busbw_gbs: float


@dataclass(frozen=True)
class Verdict:
    lines: list[str]
    """What rank 0 prints."""
    failing: str | None
    """The label of the node that fails the check (the slowest below the floor), or None."""


def _share(value: float, of: float) -> str:
    return f"{value / of:.0%} of {of:g} GB/s"


def _span(ranks: tuple[int, ...]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"


def judge(nodes: list[Figure], across: Figure | None, exp: Expected) -> Verdict:
    """One line per node and one across nodes; the slowest node against the expected figure; which node fails."""
    lines = []
    for f in nodes:
        vs = f", {_share(f.busbw_gbs, exp.node_gbs)} NVLink" if exp.node_gbs else ""
        lines.append(f"node {f.where} ({_span(f.ranks)}): {f.busbw_gbs:.2f} GB/s{vs}")
    if across is not None:
        vs = f", {_share(across.busbw_gbs, exp.across_gbs)} (the node's NICs)" if exp.across_gbs else ""
        lines.append(f"across {across.where} ({len(across.ranks)} ranks): {across.busbw_gbs:.2f} GB/s{vs}")
        if exp.across_gbs and across.busbw_gbs < FLOOR_SHARE * exp.across_gbs:
            lines.append(f"WARNING across {across.where}: {across.busbw_gbs:.2f} GB/s is below {FLOOR_SHARE:g} x "
                         f"{exp.across_gbs:g} GB/s; no single node to blame (fabric, NICs, NCCL's network "
                         "settings: cluster.network), so the check does not fail")
    failing = None
    if nodes:
        slowest = min(nodes, key=lambda f: f.busbw_gbs)
        vs = (f"{_share(slowest.busbw_gbs, exp.node_gbs)} expected (cluster.gpu.nvlink_gbps)" if exp.node_gbs
              else "no expected figure on a cpu profile (cluster.gpu.name: cpu)")
        lines.append(f"slowest node {slowest.where}: {slowest.busbw_gbs:.2f} GB/s, {vs}")
        below = sorted((f for f in nodes if f.busbw_gbs < exp.floor_gbs), key=lambda f: f.busbw_gbs)
        for f in below:
            lines.append(f"WARNING node {f.where}: {f.busbw_gbs:.2f} GB/s is below the floor of {exp.floor_gbs:g} "
                         "GB/s (train.rank_check_min_busbw_gbps)"
                         + (": it fails the check (outcome node)" if f is below[0] else ""))
        failing = below[0].where if below else None
    else:
        lines.append("one rank per node: no all-reduce inside a node to measure")
    return Verdict(lines, failing)


# --- the measurement (every rank) ---------------------------------------------------------------

def _placement() -> tuple[int, str]:
    """This rank's node: torchrun's node index, and the name Slurm knows it by (what --exclude takes)."""
    return int(os.environ.get("GROUP_RANK", "0")), os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _timed(nbytes: int, device: torch.device, group) -> float:
    """Seconds for TIMED_ROUNDS all-reduces of ``nbytes`` in ``group``, after WARMUP_ROUNDS."""
    buf = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)  # zeros: sums never overflow
    for _ in range(WARMUP_ROUNDS):
        dist.all_reduce(buf, group=group)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()  # a CPU-GPU sync point: the clock starts when the warm-up has ended
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(TIMED_ROUNDS):
        dist.all_reduce(buf, group=group)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(nodes: list[Node], device: torch.device, nbytes: int) -> tuple[list[Figure], Figure | None]:
    """Every node's all-reduce among its own ranks (all nodes at once), then one over all ranks.

    Every rank creates every node's group, in the same order (torch.distributed.new_group's rule;
    without TORCH_DIST_INIT_BARRIER a group a rank is not in costs it nothing). A node's figure is
    from the slowest of its ranks' clocks.
    """
    world = dist.get_world_size()
    inside = across = None
    if min(len(n.ranks) for n in nodes) > 1:
        mine, _ = dist.new_subgroups_by_enumeration([list(n.ranks) for n in nodes],
                                                    backend="nccl" if device.type == "cuda" else "gloo")
        inside = _timed(nbytes, device, mine)
    if len(nodes) > 1:
        across = _timed(nbytes, device, None)
    clocks: list[tuple[float | None, float | None]] = [(None, None)] * world
    dist.all_gather_object(clocks, (inside, across))
    volume = nbytes * TIMED_ROUNDS
    figures = []
    if inside is not None:
        for n in nodes:
            slowest = max(clocks[r][0] for r in n.ranks)
            figures.append(Figure(n.label, n.ranks, bus_bandwidth_gbs(volume, slowest, len(n.ranks))))
    whole = None
    if across is not None:
        whole = Figure(f"{len(nodes)} nodes", tuple(range(world)),
                       bus_bandwidth_gbs(volume, max(c[1] for c in clocks), world))
    return figures, whole


def rank_check(cfg: Config, plan: PlanNumbers) -> int:
    """0 (done or stopped), 1 (a wrong world or all-reduce), EXIT_SLOW_NODE or EXIT_OTHER_NODE."""
    stop.install()
    cpu = preflight.cpu_devices(cfg)
    if not cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("gloo" if cpu else "cpu:gloo,cuda:nccl")
    try:
        return _check(cfg, plan, cpu)
    finally:
        dist.destroy_process_group()


def _check(cfg: Config, plan: PlanNumbers, cpu: bool) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != plan.world_size:
        print(f"trainctl: rank check: world size {world} but the plan expects {plan.world_size}", flush=True)
        return 1
    backend, device = ("gloo", torch.device("cpu")) if cpu else ("nccl", torch.device("cuda"))
    placements: list[tuple[int, str]] = [(0, "")] * world
    dist.all_gather_object(placements, _placement())
    nodes = nodes_of(placements)
    nbytes = CPU_BUFFER_BYTES if cpu else GPU_BUFFER_BYTES
    figures, across = measure(nodes, device, nbytes)
    exp = expected(cfg.cluster.gpu, cfg.cluster.gpus_per_node, cpu, cfg.train.rank_check_min_busbw_gbps)
    verdict = judge(figures, across, exp)
    stopped = stop.agree()
    if rank == 0:
        print(f"trainctl: rank check: all-reduce bus bandwidth (NCCL-tests' busbw), {nbytes / 2**20:g} MiB x "
              f"{TIMED_ROUNDS} rounds, {backend}", flush=True)
        for line in verdict.lines:
            print(f"trainctl: rank check: {line}", flush=True)
        if stopped and verdict.failing is not None:
            print("trainctl: rank check: a stop signal came first: no node fails the check", flush=True)
    if verdict.failing is not None and not stopped:
        node = next(n for n in nodes if rank in n.ranks)
        if node.label == verdict.failing:
            print(f"trainctl: rank {rank}/{world} on {node.label}: this node is below the bus-bandwidth floor",
                  flush=True)
            return EXIT_SLOW_NODE
        return EXIT_OTHER_NODE
    start, rounds = time.monotonic(), 0
    while not stopped and time.monotonic() - start < cfg.train.rank_check_s:
        ones = torch.ones(1, device=device)
        dist.all_reduce(ones)
        if int(ones.item()) != world:
            print(f"trainctl: rank check: all-reduce gave {ones.item()}, expected {world}", flush=True)
            return 1
        rounds += 1
        if stop.agree():
            stopped = True
            break
        time.sleep(1.0)
    if rank == 0:
        how = f"stopped by {stop.requested() or 'a stop signal on another rank'}" if stopped else "done"
        print(f"trainctl: rank check {how}: {world} rank(s), {rounds} all-reduce round(s), "
              f"{backend}, rank 0 on {socket.gethostname()}", flush=True)
    print(f"trainctl: rank {rank}/{world} ok on {socket.gethostname()}", flush=True)
    return 0
