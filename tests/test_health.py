"""The node health check (launch/train/health.py): what it reads, what it decides, what it records.

There are no GPUs, no nvidia-smi and no InfiniBand here. Their checks are tested on sample
text (nvidia-smi's CSV, dmesg lines) and on a directory tree laid out as
/sys/class/infiniband is: stand-ins for hardware absent here, never run on real H100s or IB.
The free-space check, dmesg (where readable) and the whole module on a rendered run
directory are real. The job script's side is in tests/test_sbatch.py (stub srun) and
tests/test_slurm.py (the local Slurm).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from launch.config.schema import Network
from launch.record import outcome
from launch.train import health
from launch.train.health import Finding, Gpu, Port
from tests.conftest import PYTHONPATH, run_trainctl

# nvidia-smi --query-gpu=index,pci.bus_id,memory.total,memory.free,ecc.errors.uncorrected.volatile.total
#            --format=csv,noheader,nounits on an 8 x H100 80 GB node (the layout nvidia-smi prints;
# the numbers are made up: GPU 3 has uncorrectable errors, GPU 5 is held by another process).
SMI_H100 = """\
0, 00000000:18:00.0, 81559, 81004, 0
1, 00000000:2A:00.0, 81559, 81004, 0
2, 00000000:3A:00.0, 81559, 81004, 0
3, 00000000:5D:00.0, 81559, 81004, 2
4, 00000000:9A:00.0, 81559, 81004, 0
5, 00000000:AB:00.0, 81559, 20480, 0
6, 00000000:BA:00.0, 81559, 81004, [N/A]
7, 00000000:DB:00.0, 81559, 81004, 0
"""


def test_nvidia_smi_csv_is_read_with_n_a_as_unknown() -> None:
    gpus = health.parse_smi(SMI_H100 + "\nsome warning line\n")
    assert len(gpus) == 8
    assert gpus[0] == Gpu(0, "00000000:18:00.0", 81559.0, 81004.0, 0)
    assert gpus[6].ecc_uncorrected is None  # ECC off or not reported: not an error


def test_gpu_findings_name_each_gpu_measured_against_expected() -> None:
    found = health.gpu_findings(health.parse_smi(SMI_H100), expected=8, need_gib=60.0)
    assert found[0] == Finding(True, "8 GPU(s) (expected cluster.gpus_per_node=8)")
    assert found[1] == Finding(False, "GPU 3 (00000000:5D:00.0): 2 uncorrectable ECC error(s) (expected 0)")
    assert found[2].ok is False and found[2].text.startswith(
        "GPU 5 (00000000:AB:00.0): 20.0 GiB free of 79.6 (expected >= 60.0: the plan's per-GPU peak")
    lost = health.gpu_findings(health.parse_smi(SMI_H100)[:7], expected=8, need_gib=1.0)
    assert lost[0] == Finding(False, "7 GPU(s) (expected cluster.gpus_per_node=8)")


def test_a_plan_above_hbm_asks_only_for_most_of_each_gpu() -> None:
    """estimate.allow_oom lets a plan's peak exceed HBM: the node is not blamed for the plan."""
    gpus = [Gpu(0, "b", 81559.0, 78000.0, 0)]
    assert health.gpu_findings(gpus, expected=1, need_gib=95.0)[2].ok is True


DMESG = """\
[    5.120000] nvidia: loading out-of-tree module taints kernel.
[ 1000.000000] NVRM: Xid (PCI:0000:18:00): 79, pid=1234, GPU has fallen off the bus.
[ 7000.500000] NVRM: Xid (PCI:0000:2a:00): 13, pid=99, Graphics SM Warp Exception on (GPC 0, TPC 1)
[ 7100.250000] NVRM: Xid (PCI:0000:5d:00): 48, pid=2345, An uncorrectable double bit error (DBE) has been detected
"""


def test_recent_hardware_xids_count_and_old_or_application_ones_do_not() -> None:
    # now = 7200 s since boot: Xid 79 was 6200 s ago (history); 13 is an application fault.
    assert health.parse_xids(DMESG, now_s=7200.0) == [(48, "PCI:0000:5d:00")]
    booted = "".join(DMESG.splitlines(keepends=True)[:2])  # the log as it was 500 s after the Xid 79
    assert health.parse_xids(booted, now_s=1500.0) == [(79, "PCI:0000:18:00")]


def test_an_unreadable_kernel_log_is_not_checked_never_failed() -> None:
    def denied(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "dmesg: read kernel buffer failed: Operation not permitted\n")

    assert health.xid_finding(run=denied) == Finding(
        None, "Xid errors not checked (dmesg not readable: dmesg: read kernel buffer failed: Operation not permitted)")
    real = health.xid_finding()  # this machine's own kernel log: no NVIDIA driver, or not readable
    assert real.ok in (True, None), real


def _port(root: Path, device: str, port: int, state: str, layer: str | None) -> None:
    folder = root / device / "ports" / str(port)
    folder.mkdir(parents=True)
    (folder / "state").write_text(state + "\n")
    if layer is not None:
        (folder / "link_layer").write_text(layer + "\n")


def test_ib_ports_from_a_sysfs_tree(tmp_path: Path) -> None:
    """A tree laid out as /sys/class/infiniband (a stand-in: no RDMA device here)."""
    for i in range(4):
        _port(tmp_path, f"mlx5_{i}", 1, "4: ACTIVE", "InfiniBand")
    _port(tmp_path, "mlx5_4", 1, "1: DOWN", "Ethernet")  # a storage NIC, not the compute fabric
    ports = health.read_ports(tmp_path)
    assert ports[0] == Port("mlx5_0", "1", "ACTIVE", "InfiniBand") and len(ports) == 5
    assert health.network_findings(Network.infiniband, ports) == [Finding(True, "4 InfiniBand port(s) ACTIVE")]
    assert health.network_findings(Network.roce, ports) == [
        Finding(False, "mlx5_4 port 1: DOWN (expected ACTIVE)")]
    _port(tmp_path, "mlx5_5", 1, "2: INIT", "InfiniBand")
    assert health.network_findings(Network.infiniband, health.read_ports(tmp_path)) == [
        Finding(False, "mlx5_5 port 1: INIT (expected ACTIVE)")]


def test_no_ports_fail_only_where_the_profile_says_ib(tmp_path: Path) -> None:
    assert health.network_findings(Network.infiniband, health.read_ports(tmp_path / "none")) == [
        Finding(False, "no InfiniBand port under /sys/class/infiniband (expected some: cluster.network=infiniband)")]
    assert health.network_findings(Network.tcp, [])[0].ok is None


def test_free_space_adds_up_per_file_system_and_reads_missing_dirs_at_their_parent(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize / health.GIB
    needs = [("run dir", tmp_path, 1.0), ("checkpoints", tmp_path / "not/yet", free)]  # together: more than free
    [found] = health.space_findings(needs)
    assert found.ok is False and found.text.startswith(f"run dir, checkpoints ({tmp_path}): ")
    assert found.text.endswith(f"(expected >= {free + 1:.1f})")
    assert health.space_findings([("run dir", tmp_path, 0.001)])[0].ok is True


def _rendered(workdir: Path, *overrides: str) -> Path:
    out = run_trainctl("render", "recipe=tiny_slurm", *overrides, cwd=workdir)
    assert out.returncode == 0, out.stderr
    return workdir / "runs/tiny_slurm"


def _health(run_dir: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.train.health", str(run_dir)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": PYTHONPATH, "SLURM_JOB_ID": "31", **env}, timeout=60)


def test_a_healthy_node_prints_one_line_records_nothing_and_imports_no_torch(workdir: Path) -> None:
    run_dir = _rendered(workdir)
    out = _health(run_dir, SLURMD_NODENAME="node2", PYTHONPROFILEIMPORTTIME="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1 and out.stdout.startswith("health: node2 healthy: GPUs not checked")
    assert not (run_dir / "outcomes").exists()
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time")}
    assert not imported & {"torch", "numpy", "deepspeed", "megatron", "transformers"}


def test_the_fault_knob_fails_the_named_node_with_a_node_record_under_slurm_s_name(workdir: Path) -> None:
    run_dir = _rendered(workdir)
    assert _health(run_dir, SLURMD_NODENAME="node2", TRAINCTL_FAULT_UNHEALTHY_NODES="node1").returncode == 0
    out = _health(run_dir, SLURMD_NODENAME="node1", TRAINCTL_FAULT_UNHEALTHY_NODES=" node1 ,node3")
    assert out.returncode == health.EXIT_UNHEALTHY
    cause = "node1 is listed in TRAINCTL_FAULT_UNHEALTHY_NODES=node1,node3 (test-only fault knob)"
    assert out.stdout == f"health: node1 UNHEALTHY: {cause}\n"
    record = outcome.read(run_dir / "outcomes/31.0.json")
    assert (record.outcome.value, record.node, record.cause) == ("node", "node1", f"health check: {cause}")


def test_a_damaged_run_record_is_a_configuration_error(workdir: Path) -> None:
    run_dir = _rendered(workdir)
    (run_dir / "plan.json").write_text("{")
    out = _health(run_dir, SLURMD_NODENAME="node1")
    assert out.returncode == 2 and "plan.json" in out.stdout
    assert outcome.read(run_dir / "outcomes/31.0.json").outcome.value == "config"


def test_status_shows_the_nodes_left_out_and_why(tmp_path: Path) -> None:
    from launch.verbs.status import excluded

    (tmp_path / "job.excluded.12").write_text("node3\thealth check: GPU 2 lost\nnode7\tcrash: RuntimeError: x\n")
    assert excluded(tmp_path, "12") == "node3: health check: GPU 2 lost\nnode7: crash: RuntimeError: x"
    assert excluded(tmp_path, "13") == ""
