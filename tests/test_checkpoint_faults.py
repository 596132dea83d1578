"""Checkpoints you can trust: damaged ones are skipped, a full disk stops the run, an unwritable directory is
found at start. Real torchrun runs (2 CPU ranks, gloo), both backends; pure tests of the manifest on plain files.

One undisturbed reference run per backend (module-scoped: 10 steps, a checkpoint every 2,
train.keep_checkpoints=5, so steps 2-10 are all kept). Each fault run copies the reference's
run directory, damages its checkpoints as a fault would (the newest truncated or bit-flipped,
the one before it partly written), and resumes: it must skip each damaged one in one line,
resume from the newest that verifies, and then log exactly the reference's losses (these
tiny CPU runs are deterministic: same data, same RNG states restored, same order of sums).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from launch.record import checkpoints as ckpt
from launch.record import manifest
from launch.record import outcome
from launch.record.outcome import Outcome
from tests.conftest import PYTHONPATH, ROOT, SMALL_MODEL, run_trainctl

STEPS, EVERY = 10, 2
BACKENDS = {"deepspeed": (), "megatron": ("backend=megatron",)}


# --- pure: the manifest and the rules on plain files ---------------------------------------------

def _step_dir(root: Path, step: int, files: dict[str, bytes], *, sealed: bool = True) -> Path:
    """A committed step directory as ``Trainer.save`` leaves it, from plain bytes."""
    d = root / ckpt.step_name(step)
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    sizes = manifest.listing(d)
    marker = {"step": step, "consumed_samples": step * 8, "config": {"a": 1}}
    if sealed:
        marker["manifest"] = manifest.build(sizes, manifest.checksums(d, list(sizes)), step=step, config={"a": 1},
                                            rng_ranks=[0, 1], consumed_samples=step * 8)
        marker = manifest.seal(marker)
    (d / ckpt.MARKER).write_text(json.dumps(marker))
    return d


FILES = {"shard0.pt": os.urandom(3000), "shard1.pt": os.urandom(1000), "sub/.metadata": b"m" * 10,
         "rng_rank0.pt": b"r0", "rng_rank1.pt": b"r1"}


def test_checksums_are_crc32_and_the_split_covers_every_file_once(tmp_path):
    d = _step_dir(tmp_path, 1, FILES)
    listed = json.loads((d / ckpt.MARKER).read_text())["manifest"]["files"]
    assert set(listed) == set(FILES)  # hidden and nested files too; the marker itself not
    assert listed["shard0.pt"] == [3000, f"{zlib.crc32(FILES['shard0.pt']):08x}"]
    sizes = manifest.listing(d, exclude=(ckpt.MARKER,))
    shares = [manifest.share(sizes, r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(FILES)
    assert shares[0] == ["shard0.pt"]  # the largest alone; the rest, 1,014 bytes, to the other rank
    assert manifest.share(sizes, 0, 1) == sorted(FILES)


def test_each_kind_of_damage_is_named(tmp_path):
    d = _step_dir(tmp_path, 4, FILES)
    assert ckpt.inspect(d).problem is None and ckpt.inspect(d).verifiable
    data = bytearray((d / "shard0.pt").read_bytes())
    data[1500] ^= 0x01  # one bit, in the middle
    (d / "shard0.pt").write_bytes(bytes(data))
    found = ckpt.inspect(d)
    assert found.problem is None  # the size is unchanged: only the checksum sees it
    problems = [ckpt.verify_share(d, found, r, 2) for r in range(2)]
    assert problems[0].startswith("checksum mismatch in shard0.pt (crc32 ") and problems[1] is None
    (d / "shard1.pt").write_bytes(FILES["shard1.pt"][:600])
    assert ckpt.inspect(d).problem == "truncated file shard1.pt: size 600 != 1000"
    (d / "rng_rank1.pt").unlink()
    assert ckpt.inspect(d).problem == "missing file rng_rank1.pt"  # the first in path order
    marker = json.loads((d / ckpt.MARKER).read_text())
    marker["consumed_samples"] += 1  # a flipped digit in the marker itself
    (d / ckpt.MARKER).write_text(json.dumps(marker))
    assert ckpt.inspect(d).problem.startswith("checksum mismatch in the marker itself")
    (d / ckpt.MARKER).write_text("{\"step\": 4, ")  # a marker cut short
    assert ckpt.inspect(d).problem.startswith(f"unreadable {ckpt.MARKER}")


def test_a_missing_rng_file_is_an_error_also_without_a_manifest(tmp_path):
    legacy = _step_dir(tmp_path, 2, {"shard0.pt": b"x", "rng_rank0.pt": b"r"}, sealed=False)
    found = ckpt.inspect(legacy)
    assert found.problem is None and found.warning.startswith("no manifest") and not found.verifiable
    assert ckpt.rng_problem(legacy, found, 2) == "missing file rng_rank1.pt (the RNG states of rank 1)"
    assert ckpt.rng_problem(legacy, found, 1) is None


def test_resume_falls_back_step_by_step_and_refuses_when_none_verifies(tmp_path):
    for step in (2, 4, 6):
        _step_dir(tmp_path, step, FILES)
    (tmp_path / "latest").write_text("step_0000004")  # a rewind: step 6 is not a candidate
    assert ckpt.candidates(tmp_path) == [tmp_path / "step_0000004", tmp_path / "step_0000002"]
    (tmp_path / "latest").write_text("step_0000099")  # names nothing: every step, newest first
    assert [p.name for p in ckpt.candidates(tmp_path)] == ["step_0000006", "step_0000004", "step_0000002"]
    (tmp_path / "step_0000006" / "shard0.pt").write_bytes(b"")
    (tmp_path / "step_0000004" / ckpt.MARKER).unlink()  # partly deleted
    assert ckpt.find_resume(tmp_path) == tmp_path / "step_0000002"
    (tmp_path / "step_0000002" / "shard1.pt").unlink()
    with pytest.raises(ckpt.UserError) as exc:
        ckpt.find_resume(tmp_path)
    assert exc.value.problems[0].splitlines() == [
        f"train.checkpoint_dir={tmp_path}: no checkpoint there verifies (step_0000006: truncated file shard0.pt: "
        f"size 0 != 3000; step_0000004: no {ckpt.MARKER} (never committed, or partly deleted); step_0000002: "
        "missing file shard1.pt), so this run stops instead of training from step 0 over them",
        f"  fix: restore a good copy of a step directory, or move {tmp_path} aside to train this run from scratch"]
    assert ckpt.find_resume(tmp_path / "nothing-here") is None  # no checkpoint at all: from scratch


def test_pruning_keeps_the_newest_good_ones_however_many_damaged_follow(tmp_path):
    for step in (2, 4, 6, 8, 10):
        _step_dir(tmp_path, step, FILES, sealed=step != 4)
    for step in (8, 10):
        (tmp_path / ckpt.step_name(step) / ckpt.MARKER).write_text("{")  # damaged: not counted as good
    (tmp_path / "latest").write_text("step_0000010")
    deleted = ckpt.prune(tmp_path, keep=1)
    # 10 and 8 damaged, 6 good (the keep-th), older ones deleted; 4 (no manifest) is not counted either
    assert [p.name for p in deleted] == ["step_0000004", "step_0000002"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000006", "step_0000008", "step_0000010"]
    _step_dir(tmp_path, 12, FILES)
    (tmp_path / "latest").write_text("step_0000012")
    assert [p.name for p in ckpt.prune(tmp_path, keep=1)] == ["step_0000010", "step_0000008", "step_0000006"]


def test_an_unwritable_checkpoint_dir_is_named_with_its_error(tmp_path):
    assert ckpt.writable_problem(tmp_path / "new" / "ckpts") is None
    assert not (tmp_path / "new").exists()  # the check creates nothing
    (tmp_path / "file").write_text("x")
    problem = ckpt.writable_problem(tmp_path / "file" / "ckpts")  # fails for root too
    assert problem.startswith(f"train.checkpoint_dir={tmp_path / 'file' / 'ckpts'}: cannot write there "
                              f"(NotADirectoryError: [Errno 20] Not a directory: {tmp_path / 'file'})")
    assert "fix: point train.checkpoint_dir at a writable directory" in problem
    if os.geteuid() != 0:  # root passes permission bits: only a non-root run can test them
        (tmp_path / "ro").mkdir(mode=0o555)
        assert "PermissionError: [Errno 13]" in ckpt.writable_problem(tmp_path / "ro")


def test_submit_refuses_a_local_run_whose_checkpoint_dir_cannot_be_written(tmp_path):
    (tmp_path / "a-file").write_text("x")
    bad = tmp_path / "a-file" / "ckpts"
    out = run_trainctl("submit", "recipe=tiny_local", f"train.checkpoint_dir={bad}", "submit.preflight=true",
                       cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"train.checkpoint_dir={bad}: cannot write there (NotADirectoryError" in out.stderr


def test_keep_checkpoints_below_one_is_refused(tmp_path):
    out = run_trainctl("render", "recipe=tiny_local", "train.keep_checkpoints=0", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "train.keep_checkpoints" in out.stderr and "at least one checkpoint must be kept" in out.stderr


def test_the_job_script_stops_after_a_storage_outcome(tmp_path):
    from tests.test_sbatch import STUB_SCONTROL, STUB_SINFO, STUB_SRUN, render, run_script

    stubs = tmp_path / "stub-bin"
    stubs.mkdir()
    srun = STUB_SRUN.replace('  node) outcome node', '  storage) outcome storage "checkpoint of step 4 not saved: '
                                                     'OSError: [Errno 28] No space left on device"; exit 1 ;;\n'
                                                     '  node) outcome node')
    for name, text in (("srun", srun), ("scontrol", STUB_SCONTROL), ("sinfo", STUB_SINFO)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    script = render(tmp_path, "recipe=tiny_slurm")
    assert run_script(script, stubs, "storage", cwd=tmp_path).returncode == 1
    assert "requeue" not in (stubs / "scontrol.calls").read_text()
    assert "checkpoint storage full on node1: checkpoint of step 4 not saved: OSError: [Errno 28] No space left " \
           "on device (a requeue would fail the same way at its next save: free space and submit again); not " \
           "requeued" in (script.parent / "job.log").read_text()


# --- real runs -----------------------------------------------------------------------------------

def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **extra}


def _train(run_dir: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "launch.train",
         str(run_dir)], cwd=run_dir.parent.parent, env=_env(**env), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=400)


def _render(cwd: Path, prepared: Path, backend: str, *extra: str) -> Path:
    out = run_trainctl("render", "recipe=tiny_local", *BACKENDS[backend], f"data.prepared_dir={prepared}", *SMALL_MODEL,
                       f"train.steps={STEPS}", f"train.checkpoint_interval={EVERY}", "train.eval_interval=100",
                       "train.keep_checkpoints=5", *extra, cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    return cwd / "runs/tiny_local"


def _losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss of the train records in metrics.jsonl (the last record of a step wins)."""
    path = run_dir / "metrics.jsonl"
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"}


def _rank_traceback(out: str) -> bool:
    """A traceback through trainctl's code (torchrun prints its own, ChildFailedError, for any exit but 0)."""
    return f'File "{ROOT / "launch"}' in out


def _last_outcome(run_dir: Path) -> outcome.Record:
    return outcome.read(outcome.last(run_dir, "local"))


@pytest.fixture(scope="module", params=list(BACKENDS))
def reference(request, tmp_path_factory, prepared) -> dict:
    """An undisturbed run of one backend: its run directory and losses."""
    backend = request.param
    run_dir = _render(tmp_path_factory.mktemp(f"ref-{backend}"), prepared, backend)
    done = _train(run_dir)
    assert done.returncode == 0, done.stdout[-6000:]
    return {"backend": backend, "run_dir": run_dir, "losses": _losses(run_dir), "prepared": prepared}


def _copy(reference: dict, dest: Path, newest: int) -> Path:
    """The reference's run directory as a run stopped after step ``newest`` leaves it: no later step, no
    final export, no metrics (the resumed run's records are then the only ones)."""
    run_dir = dest / "runs/tiny_local"
    shutil.copytree(reference["run_dir"], run_dir, symlinks=True,
                    ignore=shutil.ignore_patterns("metrics.jsonl", "outcomes", "wandb", "final", "data_cache"))
    ckpts = run_dir / "checkpoints"
    for later in ckpts.glob("step_*"):
        if ckpt.step_of(later) > newest:
            shutil.rmtree(later)
    (ckpts / "latest").write_text(ckpt.step_name(newest))
    return run_dir


def _biggest(step_dir: Path) -> Path:
    return max((p for p in step_dir.iterdir() if p.name != ckpt.MARKER), key=lambda p: p.stat().st_size)


def test_damaged_newest_checkpoints_are_skipped_and_the_losses_match(reference, tmp_path):
    """8: the largest shard truncated to half; 6: one bit flipped in the middle of the largest shard (same size:
    only the checksum finds it); 4: partly written (one rank's file gone) with the save of 10 left as a .tmp_.
    The resumed run says why it skips each, resumes from step 2, and logs the reference's losses from step 3."""
    run_dir = _copy(reference, tmp_path, newest=8)
    ckpts = run_dir / "checkpoints"
    truncated = _biggest(ckpts / "step_0000008")
    size = truncated.stat().st_size
    os.truncate(truncated, size // 2)
    flipped = _biggest(ckpts / "step_0000006")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.unlink()  # a new file: the reference's may be hard-linked into its final export
    flipped.write_bytes(bytes(data))
    crcs = manifest.checksum(flipped), manifest.checksum(reference["run_dir"] / "checkpoints/step_0000006" / flipped.name)
    shards = sorted(p.name for p in (ckpts / "step_0000004").glob("*.distcp"))  # torch_dist's data files
    gone = "rng_rank1.pt" if reference["backend"] == "deepspeed" else shards[-1]
    (ckpts / "step_0000004" / gone).unlink()
    shutil.copytree(ckpts / "step_0000004", ckpts / ".tmp_step_0000010")
    (ckpts / ".tmp_step_0000010" / ckpt.MARKER).unlink()

    done = _train(run_dir)
    assert done.returncode == 0, done.stdout[-6000:]
    skips = [ln for ln in done.stdout.splitlines() if "skipped checkpoint" in ln]
    assert skips == [
        f"trainctl: skipped checkpoint {ckpts / 'step_0000008'}: truncated file {truncated.name}: size {size // 2} "
        f"!= {size}; trying the one before it",
        f"trainctl: skipped checkpoint {ckpts / 'step_0000006'}: checksum mismatch in {flipped.name} (crc32 "
        f"{crcs[0]} != {crcs[1]}); trying the one before it",
        f"trainctl: skipped checkpoint {ckpts / 'step_0000004'}: missing file {gone}; trying the one before it"]
    assert f"resumed from {ckpts / 'step_0000002'}: step 2," in done.stdout
    assert "verified" in done.stdout and "Traceback" not in done.stdout
    ref = reference["losses"]
    assert _losses(run_dir) == {s: ref[s] for s in range(3, STEPS + 1)}  # exactly: deterministic on CPU
    assert _last_outcome(run_dir).outcome == Outcome.done
    assert ckpt.find_resume(ckpts) == ckpts / ckpt.step_name(STEPS) and not list(ckpts.glob(".tmp_*"))


def test_checkpoints_of_which_none_verifies_stop_the_run_and_nothing_trains(reference, tmp_path):
    """Step 4 bit-flipped (sizes intact: it passes preflight's checks, the ranks' checksums refuse it), step 2
    truncated: the job ends with ``config`` naming both, and trains nothing from step 0 over them."""
    if reference["backend"] != "deepspeed":
        pytest.skip("the same skeleton path on both backends")
    run_dir = _copy(reference, tmp_path, newest=4)
    ckpts = run_dir / "checkpoints"
    flipped = _biggest(ckpts / "step_0000004")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x01
    flipped.unlink()
    flipped.write_bytes(bytes(data))
    os.truncate(_biggest(ckpts / "step_0000002"), 100)
    done = _train(run_dir)
    assert done.returncode != 0 and not _rank_traceback(done.stdout), done.stdout[-6000:]
    record = _last_outcome(run_dir)
    assert record.outcome == Outcome.config
    assert record.cause.startswith(f"train.checkpoint_dir={ckpts}: no checkpoint there verifies (step_0000004: "
                                   f"checksum mismatch in {flipped.name} (crc32 ")
    assert "; step_0000002: truncated file " in record.cause
    assert f"fix: restore a good copy of a step directory, or move {ckpts} aside" in done.stdout
    assert done.stdout.count("trainctl: skipped checkpoint") == 2
    assert not (run_dir / "metrics.jsonl").exists() or not _losses(run_dir)  # nothing trained


def test_a_full_disk_at_a_save_stops_the_run_and_the_resume_matches(reference, tmp_path):
    """The save of step 4 runs out of space on rank 1 after the engine's shards: the partial save is removed,
    step 2 and ``latest`` are intact, the outcome is ``storage``; once space is back the run resumes from 2.
    train.keep_checkpoints=1 on the way: one checkpoint is left at the end."""
    run_dir = _render(tmp_path, reference["prepared"], reference["backend"], "train.keep_checkpoints=1")
    ckpts = run_dir / "checkpoints"
    full = _train(run_dir, TRAINCTL_FAULT_DISK_FULL_AT_STEP="4")
    assert full.returncode != 0 and not _rank_traceback(full.stdout), full.stdout[-6000:]
    record = _last_outcome(run_dir)
    assert record.outcome == Outcome.storage and record.step == 4
    line = (f"checkpoint of step 4 not saved: OSError: [Errno 28] No space left on device: "
            f"{ckpts / '.tmp_step_0000004' / 'rng_rank1.pt'}; {ckpts} has ")
    assert record.cause.startswith(line[:200])  # the record holds the first 300 characters
    lines = [ln for ln in full.stdout.splitlines() if "No space left on device" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"trainctl: {line}"), lines  # one line, from rank 0
    assert "GiB free; the partial save was removed, latest is step_0000002; stopped, not requeued" in lines[0]
    assert sorted(p.name for p in ckpts.iterdir()  # DeepSpeed also leaves its zero_to_*.py scripts there
                  if not p.name.startswith("zero_to_")) == ["latest", "step_0000002"]
    assert (ckpts / "latest").read_text() == "step_0000002"

    resumed = _train(run_dir)
    assert resumed.returncode == 0, resumed.stdout[-6000:]
    assert f"resumed from {ckpts / 'step_0000002'}: step 2" in resumed.stdout
    ref = reference["losses"]
    assert _losses(run_dir) == ref  # steps 1-2 before the fault, 3-10 after it: the reference's, exactly
    assert sorted(p.name for p in ckpts.glob("step_*")) == [ckpt.step_name(STEPS)]  # keep_checkpoints=1


def test_an_unwritable_checkpoint_dir_is_found_before_training(prepared, tmp_path):
    """A path under a regular file: refused for root too (chmod 555 is not, on CI), before any engine."""
    (tmp_path / "a-file").write_text("not a directory")
    bad = tmp_path / "a-file" / "ckpts"
    run_dir = _render(tmp_path, prepared, "deepspeed", f"train.checkpoint_dir={bad}")
    done = _train(run_dir)
    assert done.returncode != 0 and not _rank_traceback(done.stdout)
    record = _last_outcome(run_dir)
    assert record.outcome == Outcome.config and record.step is None
    assert record.cause == (f"train.checkpoint_dir={bad}: cannot write there (NotADirectoryError: [Errno 20] Not a "
                            f"directory: {tmp_path / 'a-file'}); nothing was trained")
    assert not (run_dir / "metrics.jsonl").exists()
