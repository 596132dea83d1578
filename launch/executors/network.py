"""The NCCL and libfabric environment of each ``cluster.network``: data, each variable with its source.

job.sbatch exports these after trainctl's own defaults and before ``cluster.env``,
which overrides any of them (``cluster.env.NCCL_IB_HCA='=mlx5_0,mlx5_3'``).
Only what a fabric needs to be found and used is here; tuning knobs (channels,
algorithms, traffic classes) are the site's, through ``cluster.env``.

Sources:
  [NCCL]  NVIDIA, NCCL User Guide, "Environment Variables"
          (docs.nvidia.com/deeplearning/nccl/user-guide/docs/env.html) and "Logging"
          (docs.nvidia.com/deeplearning/nccl/user-guide/docs/troubleshooting/logging.html).
  [DEBUG] NVIDIA/nccl, src/debug.cc (ncclDebugInit).
  [EFA]   AWS, EC2 User Guide, "Get started with EFA and NCCL"
          (docs.aws.amazon.com/AWSEC2/latest/UserGuide/efa-start-nccl.html).
  [OFI]   aws/aws-ofi-nccl, src/platform-aws.cpp (platform_init) and its wiki "Environment Variables".

The NCCL log. ``NCCL_DEBUG=WARN`` prints only errors and warnings [NCCL], each line
prefixed with ``host:pid:tid`` [DEBUG], to the ranks' stdout: srun gathers them
into the job's own ``RUN_DIR/slurm-JOBID.log``. So the log is one file per job,
written only when something fails. ``NCCL_DEBUG_FILE`` is deliberately not set:
NCCL opens that file with ``fopen(name, "w")`` in every process [DEBUG], so a
per-node name (``%h``) would have the node's 8 ranks truncate and overwrite one
another's lines, and only a per-process name (``%h.%p``) is safe: 16,384 files
for a 2,048-node job on the parallel file system's metadata server, every
restart. For a short debugging run set both yourself:
``cluster.env.NCCL_DEBUG=INFO cluster.env.NCCL_DEBUG_FILE=/shared/path/nccl.%h.%p.log``.
"""

from __future__ import annotations

from launch.config.schema import Network

SOCKET_IFNAME = "^lo,docker"
"""[NCCL] NCCL_SOCKET_IFNAME: bootstrap and socket traffic on any interface but loopback and docker bridges."""

LOGGING = {"NCCL_DEBUG": "WARN"}
"""[NCCL] NCCL_DEBUG: WARN, errors only, into the job's log (the module docstring says where and why)."""

NETWORK_ENV: dict[Network, dict[str, str]] = {
    Network.infiniband: {
        "NCCL_IB_HCA": "mlx5",  # [NCCL] NCCL_IB_HCA: HCA names by prefix: every ConnectX port (mlx5_0, mlx5_1...)
        "NCCL_SOCKET_IFNAME": SOCKET_IFNAME,
    },
    Network.roce: {
        "NCCL_IB_HCA": "mlx5",  # [NCCL] RoCE NICs are verbs devices too: NCCL's IB transport drives them
        # [NCCL] NCCL_IB_GID_INDEX: the GID NCCL uses in RoCE mode. 3 is ConnectX's usual RoCE v2 IPv4 GID
        # (`ibv_devinfo -v` shows the table); NCCL >= 2.21 picks a RoCE v2 GID itself when it is unset (-1),
        # older NCCL needs it. Override with cluster.env.NCCL_IB_GID_INDEX where the table differs.
        "NCCL_IB_GID_INDEX": "3",
        "NCCL_SOCKET_IFNAME": SOCKET_IFNAME,
    },
    Network.efa: {
        # [EFA] libfabric's efa provider, as AWS's NCCL guide runs it. aws-ofi-nccl's EC2 code also picks efa
        # when FI_PROVIDER is unset [OFI]; naming it keeps the choice explicit for a plugin built without that code.
        "FI_PROVIDER": "efa",
        "FI_EFA_USE_DEVICE_RDMA": "1",  # [EFA] GPUDirect RDMA over EFA (p4d, p5 instances)
        "NCCL_SOCKET_IFNAME": SOCKET_IFNAME,
    },
    Network.tcp: {
        "NCCL_IB_DISABLE": "1",  # [NCCL] NCCL_IB_DISABLE=1: no IB/RoCE transport; NCCL falls back to IP sockets
        "NCCL_SOCKET_IFNAME": SOCKET_IFNAME,
    },
    Network.none: {},
}


def network_env(network: Network) -> dict[str, str]:
    """The variables ``network`` needs, with NCCL's logging; nothing for ``none`` (CPU/gloo profiles)."""
    if network == Network.none:
        return {}
    return {**LOGGING, **NETWORK_ENV[network]}
