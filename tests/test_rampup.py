"""Global-batch ramp-up: the plan's arithmetic against megatron-core's own calculator, and the numbers a user sees."""

from __future__ import annotations

import json

import pytest

from launch.config.rampup import Rampup, batch_at, phases, schedule
from tests.conftest import run_trainctl, typed

# (start, increment, ramp samples, global batch): GPT-3 175B as Megatron-LM's example runs it, and odd ones.
RAMPS = [(16, 16, 5_859_375, 1536), (32, 32, 1000, 256), (4, 4, 16, 8), (3, 5, 97, 23)]


def _megatron_batches(start, inc, samples, gbs, steps: int) -> list[int]:
    """The batch of each step as megatron-core's RampupBatchsizeNumMicroBatchesCalculator sets it."""
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    calc = RampupBatchsizeNumMicroBatchesCalculator(gbs, 1, 1, False, 1, start, inc, samples)
    out, consumed = [], 0
    for _ in range(steps):
        calc.update(consumed, consistency_check=False)
        out.append(calc.get_current_global_batch_size())
        consumed += out[-1]
    return out


@pytest.mark.parametrize("start,inc,samples,gbs", RAMPS)
def test_batches_follow_megatron_core(start, inc, samples, gbs):
    ramp = Rampup(start, inc, samples)
    expanded = [b for b, n in phases(gbs, ramp) for _ in range(n)]
    tail = 5
    assert expanded + [gbs] * tail == _megatron_batches(start, inc, samples, gbs, len(expanded) + tail)
    consumed = 0
    for b in expanded:
        assert batch_at(consumed, gbs, ramp) == b
        consumed += b


def test_gpt3_ramp_takes_the_steps_megatron_takes():
    """GPT-3 175B: 16 -> 1536 over 5,859,375 samples (~12B tokens of 2,048): 95 increments, ~19.8k steps."""
    ramp = Rampup(16, 16, 5_859_375)
    ramp_phases = phases(1536, ramp)
    assert len(ramp_phases) == 95 and ramp_phases[0][0] == 16 and ramp_phases[-1][0] == 1520
    ramp_steps = sum(n for _, n in ramp_phases)
    assert ramp_steps == len([b for b in _megatron_batches(16, 16, 5_859_375, 1536, 20_000) if b < 1536])
    steps, samples = schedule(1536, ramp, steps=ramp_steps + 10)
    assert samples == sum(b * n for b, n in ramp_phases) + 10 * 1536


def test_ramp_up_lengthens_a_token_budget_and_shortens_a_step_budget():
    flat_cfg, flat = typed("train.steps=null", "train.tokens=409600")
    _, ramped = typed("train.steps=null", "train.tokens=409600", "train.rampup_batch_size=[2,2,64]")
    assert flat.steps == 409600 // (8 * 256) == 200
    assert ramped.tokens == flat.tokens and ramped.steps > flat.steps
    assert ramped.samples * 256 >= 409600 > (ramped.samples - 8) * 256
    _, by_steps = typed("train.rampup_batch_size=[2,2,64]")  # 20 steps: 2,2,...,4,...,6,...
    assert by_steps.steps == 20 and by_steps.tokens == by_steps.samples * 256 < 20 * 8 * 256


def test_plan_and_megatron_lm_flags_carry_the_ramp(workdir):
    run_trainctl("render", "recipe=tiny_local", "backend=megatron", "train.rampup_batch_size=[4,4,64]", cwd=workdir)
    run_dir = workdir / "runs" / "tiny_local"
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["run"]["steps"] == 20
    assert plan["run"]["tokens"] == schedule(8, Rampup(4, 4, 64), steps=20)[1] * 256
    assert "--rampup-batch-size 4 4 64" in (run_dir / "megatron_args.txt").read_text()
    assert "rampup_batch_size:\n  - 4\n  - 4\n  - 64" in (run_dir / "megatron.yaml").read_text()
