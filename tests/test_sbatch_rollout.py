"""An RL stage's vLLM rollout on a GPU cluster (stage.rollout.*): the job script, the validation, TRL's keys.

vLLM cannot run here (GPU only, not installed), so the server is never started for real: the job script is
rendered, passes shellcheck, and its server step's arguments are parsed by TRL 1.16's own ``trl vllm-serve``
parser. Its shell logic runs in bash with a stub ``srun`` and ``scontrol`` (no Slurm, no GPU): where the
script starts the server, the stub serves ``/health`` with Python's http.server instead of vLLM (a real
HTTP server on 127.0.0.1, polled by the script's real curl), or dies, or never answers.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config.compose import compose
from launch.errors import UserError
from launch.executors.sbatch import render_array
from launch.train.rollout import trl_vllm_args
from launch.verbs.plan import make_plan
from tests.conftest import PYTHONPATH, debian_tool, run_trainctl, typed
from tests.test_shellcheck import shellcheck

SERVER = ("recipe=llama3_8b_sft_h100", "stage=rlhf", "stage.init_checkpoint=/models/sft_hf",
          "stage.rewards=[exact_match]", "stage.rollout.engine=vllm_server", "stage.rollout.nodes=1",
          "stage.rollout.tensor_parallel=8")
"""The 8B recipe's 2 training nodes of 8 H100s, as GRPO with a vLLM server on a third node."""
TINY_SERVER = ("recipe=tiny_slurm", "cluster.gpu.name=h100", "stage=rlhf", "stage.lr=1e-4", "stage.init_checkpoint=/models/tiny_hf",
               "stage.rewards=[exact_match]", "stage.rollout.engine=vllm_server", "stage.rollout.nodes=1",
               "stage.rollout.tensor_parallel=2")
"""The tiny Slurm recipe with a GPU's name (vLLM is refused on a cpu profile), for running the script's shell."""


def render(workdir: Path, *overrides: str) -> Path:
    out = run_trainctl("render", *overrides, cwd=workdir)
    assert out.returncode == 0, out.stderr
    return next((workdir / "runs").glob("**/job.sbatch"))


def line_with(text: str, *words: str) -> str:
    """The script's one line that holds every word (a job step's srun line)."""
    (line,) = [ln for ln in text.splitlines() if all(w in ln for w in words) and not ln.lstrip().startswith("#")]
    return line


def test_the_server_gets_its_own_node_and_step_and_training_starts_after_its_health(workdir: Path) -> None:
    script = render(workdir, *SERVER)
    text = script.read_text()
    assert "#SBATCH --nodes=3" in text.splitlines()  # cluster.nodes=2 train, stage.rollout.nodes=1 serves
    server = line_with(text, "srun ", "vllm-serve")
    assert '--nodes=1 --nodelist="$ROLLOUT_NODES"' in server and server.endswith('> "$ROLLOUT_LOG" 2>&1 &')
    train = line_with(text, "--kill-on-bad-exit")
    assert '--nodes=2 --nodelist="$TRAIN_NODES"' in train
    assert "--nodes=3 " in line_with(text, "launch.train.health")  # every node is checked, the server's too
    assert text.index("start_rollout;") < text.index("-m launch.train \"$RUN_DIR\" &")
    assert "ROLLOUT_MODEL=/models/sft_hf" in text and "ROLLOUT_TIMEOUT_S=900" in text
    assert 'url="http://$ROLLOUT_ADDR:$ROLLOUT_PORT/health"' in text
    check = shellcheck(script)
    assert check.returncode == 0, check.stdout

    # The server step's arguments, as `trl vllm-serve` (TRL 1.16's own parser) reads them: all recognised.
    from trl.scripts.vllm_serve import build_command, make_parser

    words = shlex.split(server.split("vllm-serve", 1)[1].split(">", 1)[0].replace('"$ROLLOUT_MODEL"', "/models/sft_hf"))
    args, extra = make_parser().parse_args_and_config(args=words, return_remaining_strings=True)
    assert extra == []
    assert (args.model, args.tensor_parallel_size, args.port, args.max_model_len) == ("/models/sft_hf", 8, 8000, 8192)
    serve = build_command(args)
    assert serve[serve.index("--tensor-parallel-size") + 1] == "8" and "--weight-transfer-config" in serve


def test_the_job_array_serves_each_point_s_model(tmp_path: Path) -> None:
    plans = [make_plan(compose([*TINY_SERVER, f"stage.init_checkpoint=/models/{name}"])) for name in ("a", "b")]
    dirs = [tmp_path / "a", tmp_path / "b"]
    array = tmp_path / "array.sbatch"
    array.write_text(render_array(plans[0].cfg, dirs, tmp_path, [p.numbers for p in plans],
                                  [d / "checkpoints" for d in dirs], cfgs=[p.cfg for p in plans]))
    text = array.read_text()
    assert "ROLLOUT_MODELS=(/models/a /models/b)" in text and "#SBATCH --nodes=2" in text.splitlines()
    check = shellcheck(array)
    assert check.returncode == 0, check.stdout


# --- the script's shell, with stub srun and scontrol --------------------------------------------

STUB_SRUN = """#!/bin/bash
# stub srun (no Slurm, no GPU, no vLLM here). The server step: $VLLM_MODE says what the "server" does;
# `up` serves $STUB_LOG/www (a file named health) with Python's http.server on the rendered port.
# The health step: every node healthy. The training step: records its arguments and environment,
# then writes the outcome record a rank would.
if printf '%s\\n' "$@" | grep -qx vllm-serve; then
  printf '%s\\n' "$@" > "$STUB_LOG/srun.vllm.args"
  port=$(printf '%s\\n' "$@" | grep -A1 -x -- --port | tail -n 1)
  case "$VLLM_MODE" in
    up) exec "$STUB_PYTHON" -m http.server "$port" --bind 127.0.0.1 --directory "$STUB_LOG/www" ;;
    die) echo "ValueError: no model in /models/tiny_hf (config.json missing)"; exit 3 ;;
    silent) exec sleep 60 ;;
  esac
fi
if printf '%s\\n' "$@" | grep -qx launch.train.health; then
  echo "health: node1 healthy: stub"
  exit 0
fi
run_dir=${@: -1}
printf '%s\\n' "$@" > "$STUB_LOG/srun.args"
echo "$TRAINCTL_ROLLOUT_HOST" > "$STUB_LOG/srun.rollout_host"
"$STUB_PYTHON" -c 'import sys, pathlib; from launch.record.outcome import write
write(pathlib.Path(sys.argv[1]), "done", "trained 20 steps")' "$run_dir"
"""
STUB_SCONTROL = """#!/bin/bash
# stub scontrol (no Slurm here): the job's nodes; every node's address is this machine's loopback
echo "$*" >> "$STUB_LOG/scontrol.calls"
case "$1 $2" in
  "show hostnames") tr ',' '\\n' <<< "$3" ;;
  "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=127.0.0.1 NodeHostName=$3" ;;
esac
exit 0
"""
STUB_SINFO = """#!/bin/bash
printf 'node1 idle\\nnode2 idle\\nnode3 idle\\n'
"""


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    debian_tool("curl", "curl")  # the script polls /health with it
    bin_dir = tmp_path / "stub-bin"
    (bin_dir / "www").mkdir(parents=True)
    (bin_dir / "www" / "health").write_text("")
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("sinfo", STUB_SINFO)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: Path, stubs: Path, mode: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(stubs), "VLLM_MODE": mode,
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1,node2", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_PARTITION": "debug", "SLURMD_NODENAME": "node1", "SLURM_RESTART_COUNT": "0",
           "STUB_PYTHON": sys.executable, "PYTHONPATH": PYTHONPATH}
    return subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_training_starts_once_the_server_answers_and_finds_it(workdir: Path, stubs: Path) -> None:
    script = render(workdir, *TINY_SERVER, f"stage.rollout.port={free_port()}")
    result = run_script(script, stubs, "up", workdir)
    assert result.returncode == 0, result.stderr
    log = (script.parent / "job.log").read_text()
    assert "vLLM server on node2 answered http://127.0.0.1:" in log
    train = (stubs / "srun.args").read_text().splitlines()
    assert "--nodelist=node1" in train and "--nodes=1" in train  # the server's node does not train
    assert "--nodelist=node2" in (stubs / "srun.vllm.args").read_text().splitlines()
    assert (stubs / "srun.rollout_host").read_text().strip() == "127.0.0.1"  # the trainer's vllm_server_host


def test_a_server_that_dies_stops_the_job_as_a_configuration_error(workdir: Path, stubs: Path) -> None:
    script = render(workdir, *TINY_SERVER, f"stage.rollout.port={free_port()}")
    result = run_script(script, stubs, "die", workdir)
    assert result.returncode == 3
    assert not (stubs / "srun.args").exists()  # training never started
    line = [ln for ln in (script.parent / "job.log").read_text().splitlines() if "not requeued" in ln][-1]
    assert "configuration error found on node2: the vLLM server (trl vllm-serve on node2) exited with code 3" in line
    assert "its last line: ValueError: no model in /models/tiny_hf" in line and "vllm.4242.0.log" in line
    assert not (stubs / "scontrol.calls").read_text().count("requeue")


def test_a_server_that_never_answers_is_a_crash_of_its_node(workdir: Path, stubs: Path) -> None:
    script = render(workdir, *TINY_SERVER, f"stage.rollout.port={free_port()}", "stage.rollout.server_timeout_s=3")
    result = run_script(script, stubs, "silent", workdir)
    assert result.returncode == 0, result.stderr  # requeued
    log = (script.parent / "job.log").read_text()
    assert "did not answer http://127.0.0.1:" in log and "stage.rollout.server_timeout_s=3 s" in log
    assert "vLLM server start crashed on node2" in log and "leaving out node2" in log
    calls = (stubs / "scontrol.calls").read_text()
    assert "requeue 4242" in calls and "ExcNodeList=node2" in calls
    assert not (stubs / "srun.args").exists()


# --- validation: exit 2, one line per problem naming the key, the value and a fix ---------------

@pytest.mark.parametrize("overrides,words", [
    (("stage.rollout.nodes=2", "stage.rollout.tensor_parallel=3", "stage.rollout.port=51216"),
     ["stage.rollout.nodes=2: `trl vllm-serve` serves from one node", "fix: stage.rollout.nodes=1",
      "stage.rollout.tensor_parallel=3, cluster.gpus_per_node=8", "choose stage.rollout.tensor_parallel from [1, 2, 4, 8]",
      "stage.rollout.port=51216: TRL's weight-sync group"]),
    (("stage.rollout.nodes=0",), ["stage.rollout.engine=vllm_server, stage.rollout.nodes=0", "fix: stage.rollout.nodes=1"]),
])
def test_bad_rollout_settings_exit_2_naming_the_key(workdir: Path, overrides, words) -> None:
    out = run_trainctl("plan", *SERVER, *overrides, cwd=workdir)
    assert out.returncode == 2, out.stdout
    assert all(w in out.stderr for w in words), out.stderr
    assert "Traceback" not in out.stderr and not (workdir / "runs").exists()


def test_vllm_on_a_cpu_cluster_and_rollout_keys_outside_rl_are_refused(workdir: Path) -> None:
    out = run_trainctl("plan", "recipe=tiny_slurm", "stage=rlhf", "stage.init_checkpoint=/m", "stage.rewards=[format]",
                       "stage.rollout.engine=vllm_colocate", cwd=workdir)
    assert out.returncode == 2 and "cluster.gpu.name=cpu: vLLM runs on GPUs only" in out.stderr, out.stderr
    assert "fix: stage.rollout.engine=hf" in out.stderr
    out = run_trainctl("plan", "recipe=tiny_slurm", "stage.rollout.engine=vllm_server", cwd=workdir)
    assert out.returncode == 2 and "stage=pretrain, stage.rollout.engine=vllm_server" in out.stderr, out.stderr
    assert "fix: stage=rlhf, or leave stage.rollout.* at its defaults (stage.rollout.engine=hf)" in out.stderr


# --- the trainer's TRL keys -------------------------------------------------------------------

def test_trl_vllm_args_are_trl_1_16_config_keys() -> None:
    from trl import GRPOConfig, RLOOConfig

    base = [*SERVER[:4]]
    cfg, _ = typed(*base)
    assert trl_vllm_args(cfg, {}) == {"use_vllm": False}
    cfg, _ = typed(*base, "stage.rollout.engine=vllm_colocate", "stage.rollout.tensor_parallel=2",
                   "stage.rollout.gpu_memory_utilization=0.4")
    colocate = trl_vllm_args(cfg, {})
    assert colocate == {"use_vllm": True, "vllm_mode": "colocate", "vllm_tensor_parallel_size": 2,
                        "vllm_gpu_memory_utilization": 0.4, "vllm_max_model_length": 8192}
    cfg, _ = typed(*SERVER, "stage.rollout.port=8100", "stage.rollout.server_timeout_s=600")
    server = trl_vllm_args(cfg, {"TRAINCTL_ROLLOUT_HOST": "10.0.0.9"})
    assert server == {"use_vllm": True, "vllm_mode": "server", "vllm_server_host": "10.0.0.9",
                      "vllm_server_port": 8100, "vllm_server_timeout": 600.0}
    for config in (GRPOConfig, RLOOConfig):
        names = {f.name for f in dataclasses.fields(config)}
        assert set(colocate) | set(server) <= names, config.__name__
    with pytest.raises(UserError, match=r"\$TRAINCTL_ROLLOUT_HOST is not set"):
        trl_vllm_args(cfg, {})
