"""The rank check's bus-bandwidth test (launch/train/rankcheck.py): its arithmetic, and real runs.

The runs are real: torchrun starts ``python -m launch.train`` on CPU ranks talking gloo, one
torchrun per "node" (two agents on this machine with a static rendezvous pose as two nodes, as
the sbatch script starts one per node). No part of torch.distributed is replaced. On a cpu
profile there is no expected figure, so the failing node is made with the floor
(``train.rank_check_min_busbw_gbps``), set out of reach.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launch.record import outcome
from launch.record.outcome import Outcome
from launch.train.rankcheck import (EXIT_OTHER_NODE, EXIT_SLOW_NODE, Expected, Figure, bus_bandwidth_gbs,
                                    expected, judge, nodes_of)
from tests.conftest import PYTHONPATH, run_trainctl, typed

# --- the arithmetic -----------------------------------------------------------------------------

def test_bus_bandwidth_is_nccl_tests_formula():
    # 256 MiB over 8 ranks in 1.0 ms: algbw = 268,435,456 B / 1e-3 s = 268.435456 GB/s (1e9 B/s, as
    # NCCL-tests), busbw = algbw x 2(8-1)/8 = 268.435456 x 1.75 = 469.762048 GB/s.
    assert bus_bandwidth_gbs(268_435_456, 1.0e-3, 8) == pytest.approx(469.762048)
    assert bus_bandwidth_gbs(10 * 268_435_456, 10.0e-3, 8) == pytest.approx(469.762048)  # rounds add up
    assert bus_bandwidth_gbs(2_000_000_000, 1.0, 2) == pytest.approx(2.0)  # two ranks: busbw = algbw
    with pytest.raises(ValueError, match="ranks=1"):
        bus_bandwidth_gbs(1, 1.0, 1)  # 2(n-1)/n = 0: nothing crosses a link


def test_expected_figures_from_the_h100_profile():
    cfg, _ = typed("recipe=llama3_8b_pretrain_h100")
    gpu = cfg.cluster.gpu
    exp = expected(gpu, cfg.cluster.gpus_per_node, cpu=False, min_busbw_gbs=None)
    # Inside a node: NVLink 4 per GPU per direction (900 GB/s counts both). Across nodes: 8 NDR NICs
    # of 400 Gb/s = 50 GB/s each (bits, not bytes). The floor: half of NVLink's.
    assert (gpu.nvlink_gbps, gpu.ib_gbps, cfg.cluster.gpus_per_node) == (450.0, 50.0, 8)
    assert exp == Expected(node_gbs=450.0, across_gbs=400.0, floor_gbs=225.0)
    assert expected(gpu, 16, cpu=False, min_busbw_gbs=None).across_gbs == 450.0  # never above NVLink
    assert expected(gpu, 8, cpu=False, min_busbw_gbs=300.0).floor_gbs == 300.0
    assert expected(gpu, 8, cpu=False, min_busbw_gbs=0.0).floor_gbs == 0.0  # report only
    assert expected(gpu, 8, cpu=True, min_busbw_gbs=None) == Expected(None, None, 0.0)


def test_nodes_are_grouped_by_torchrun_node_index():
    # Slurm's names where they differ; name#index where two agents share a host (as in these tests).
    assert [(n.label, n.ranks) for n in nodes_of([(0, "a"), (0, "a"), (1, "b"), (1, "b")])] == [
        ("a", (0, 1)), ("b", (2, 3))]
    assert [n.label for n in nodes_of([(1, "vm"), (0, "vm")])] == ["vm#0", "vm#1"]


H100 = Expected(node_gbs=450.0, across_gbs=400.0, floor_gbs=225.0)


def test_judge_names_the_slowest_node_against_nvlink():
    nodes = [Figure("gpu1", tuple(range(8)), 371.0), Figure("gpu2", tuple(range(8, 16)), 352.5)]
    v = judge(nodes, Figure("2 nodes", tuple(range(16)), 360.0), H100)
    assert v.failing is None
    assert v.lines == ["node gpu1 (ranks 0-7): 371.00 GB/s, 82% of 450 GB/s NVLink",
                       "node gpu2 (ranks 8-15): 352.50 GB/s, 78% of 450 GB/s NVLink",
                       "across 2 nodes (16 ranks): 360.00 GB/s, 90% of 400 GB/s (the node's NICs)",
                       "slowest node gpu2: 352.50 GB/s, 78% of 450 GB/s expected (cluster.gpu.nvlink_gbps)"]


def test_judge_fails_the_slowest_node_below_the_floor_and_warns_for_the_others():
    nodes = [Figure("gpu1", (0, 1), 371.0), Figure("gpu2", (2, 3), 200.0), Figure("gpu3", (4, 5), 24.0)]
    v = judge(nodes, None, H100)
    assert v.failing == "gpu3"  # one node per job: the record names one, the job script excludes it
    warnings = [line for line in v.lines if line.startswith("WARNING")]
    assert warnings == [
        "WARNING node gpu3: 24.00 GB/s is below the floor of 225 GB/s (train.rank_check_min_busbw_gbps): "
        "it fails the check (outcome node)",
        "WARNING node gpu2: 200.00 GB/s is below the floor of 225 GB/s (train.rank_check_min_busbw_gbps)"]
    assert "slowest node gpu3: 24.00 GB/s, 5% of 450 GB/s expected" in v.lines[-3]


def test_a_slow_fabric_warns_but_names_no_node():
    v = judge([Figure("gpu1", (0, 1), 371.0), Figure("gpu2", (2, 3), 360.0)],
              Figure("2 nodes", (0, 1, 2, 3), 150.0), H100)
    assert v.failing is None
    assert any(line.startswith("WARNING across 2 nodes: 150.00 GB/s is below 0.5 x 400 GB/s") for line in v.lines)


def test_judge_on_a_cpu_profile_compares_nothing():
    v = judge([Figure("vm", (0, 1), 1.2)], None, Expected(None, None, 0.0))
    assert v.failing is None
    assert v.lines == ["node vm (ranks 0-1): 1.20 GB/s",
                       "slowest node vm: 1.20 GB/s, no expected figure on a cpu profile (cluster.gpu.name: cpu)"]
    one_rank_nodes = judge([], Figure("2 nodes", (0, 1), 1.0), Expected(None, None, 0.0))
    assert one_rank_nodes.lines[-1] == "one rank per node: no all-reduce inside a node to measure"


# --- real runs: torchrun, gloo ------------------------------------------------------------------

def _render(cwd: Path, *overrides: str) -> Path:
    out = run_trainctl("render", "recipe=tiny_local", "train.rank_check_s=1", *overrides, cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    return cwd / "runs/tiny_local"


def _torchrun(run_dir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1"}
    env.pop("SLURMD_NODENAME", None)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", *args,
                             "-m", "launch.train", str(run_dir)],
                            cwd=run_dir.parent.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _record(run_dir: Path) -> outcome.Record:
    (path,) = (run_dir / outcome.DIR).glob("*.json")
    return outcome.read(path)


def test_one_node_prints_its_figure_and_the_check_is_done(workdir: Path):
    run_dir = _render(workdir)
    proc = _torchrun(run_dir, "--standalone")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    host = socket.gethostname()
    assert "rank check: all-reduce bus bandwidth (NCCL-tests' busbw), 4 MiB x 10 rounds, gloo" in out
    assert re.search(rf"rank check: node {re.escape(host)} \(ranks 0-1\): \d+\.\d\d GB/s\n", out), out
    assert f"rank check: slowest node {host}: " in out and "no expected figure on a cpu profile" in out
    assert "across" not in out  # one node: no figure across nodes
    assert out.index("slowest node") < out.index("rank check done: 2 rank(s)")
    assert _record(run_dir).outcome is Outcome.done


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_the_slowest_below_the_floor_ends_the_job_with_a_node_outcome(workdir: Path):
    # Two nodes emulated on this machine: a Slurm profile (a local cluster is one node), torchrun started by hand.
    run_dir = _render(workdir, "cluster=slurm_local", "cluster.nodes=2", "train.rank_check_min_busbw_gbps=1e6")
    port = _free_port()
    agents = [_torchrun(run_dir, "--nnodes=2", f"--node-rank={n}", "--master-addr=127.0.0.1",
                        f"--master-port={port}") for n in (0, 1)]
    outs = [a.communicate(timeout=120)[0] for a in agents]
    assert [a.returncode for a in agents] == [1, 1], outs  # torchrun's 1, whatever the ranks returned
    report = outs[0]  # rank 0 runs under the first agent
    lines = re.findall(r"trainctl: rank check: (.*)", report)
    host = re.escape(socket.gethostname())
    assert re.fullmatch(rf"node {host}#0 \(ranks 0-1\): \d+\.\d\d GB/s", lines[1]), lines
    assert re.fullmatch(rf"node {host}#1 \(ranks 2-3\): \d+\.\d\d GB/s", lines[2]), lines
    assert re.fullmatch(r"across 2 nodes \(4 ranks\): \d+\.\d\d GB/s", lines[3]), lines
    slowest = re.fullmatch(rf"slowest node ({host}#(\d)): (\S+) GB/s, no expected figure on a cpu profile "
                           r"\(cluster.gpu.name: cpu\)", lines[4])
    assert slowest, lines
    label, index = slowest.group(1), int(slowest.group(2))
    assert lines[5] == (f"WARNING node {label}: {slowest.group(3)} GB/s is below the floor of 1e+06 GB/s "
                        "(train.rank_check_min_busbw_gbps): it fails the check (outcome node)")
    assert "rank check done" not in report
    # The slow node's ranks exit 4 and one of them writes the record; the other node's exit 5, silently.
    slow, other = outs[index], outs[1 - index]
    assert f"exitcode  : {EXIT_SLOW_NODE}" in slow and f"exitcode  : {EXIT_OTHER_NODE}" in other
    assert len(re.findall(rf"on {re.escape(label)}: this node is below the bus-bandwidth floor", slow)) == 2
    record = _record(run_dir)
    assert record.outcome is Outcome.node and record.rank in (2 * index, 2 * index + 1)
    assert "train.rank_check_min_busbw_gbps" in record.cause
