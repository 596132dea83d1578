"""``train.rank_check_s > 0``: check an allocation instead of training.

Every rank joins the process group (NCCL on GPUs, gloo on CPUs), checks that
the world is the size the plan expects, and all-reduces once a second for
``rank_check_s`` seconds, stopping early, on every rank together, when a stop
signal arrives. It exercises what a training job needs before its first step:
the rendezvous, the collective backend, the signal path of the sbatch script.
"""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist

from launch.config.schema import Config
from launch.record.read import PlanNumbers
from launch.train import stop
from launch.train.preflight import cpu_devices


def rank_check(cfg: Config, plan: PlanNumbers) -> int:
    seconds = cfg.train.rank_check_s
    stop.install()
    backend = "gloo" if cpu_devices(cfg) else "nccl"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    expected = plan.world_size
    if world != expected:
        print(f"trainctl: rank check: world size {world} but the plan expects {expected}", flush=True)
        dist.destroy_process_group()
        return 1
    device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")
    start, rounds = time.monotonic(), 0
    stopped = False
    while time.monotonic() - start < seconds:
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
    dist.destroy_process_group()
    return 0
