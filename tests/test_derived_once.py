"""Numbers both the login side and the trainers use come from one function each."""

from __future__ import annotations

from launch.config.derive import mfu_peak_tflops, pipeline_split, stage_layers, uneven_split
from launch.config.stages import trains
from launch.estimate.perf import TERA, mfu_peak_flops
from tests.conftest import typed


def test_mfu_peak_follows_the_basis_and_the_estimator_uses_it():
    cfg, _ = typed("cluster=h100")
    assert mfu_peak_tflops(cfg) == cfg.cluster.gpu.peak_bf16_tflops
    assert mfu_peak_flops(cfg) == mfu_peak_tflops(cfg) * TERA
    fp8, _ = typed("cluster=h100", "estimate.mfu_basis=fp8")
    assert mfu_peak_tflops(fp8) == fp8.cluster.gpu.peak_fp8_tflops


def test_every_split_tune_places_adds_up():
    for layers in range(4, 130, 3):
        for pp in range(2, 17):
            for vpp in (1, 2):
                split = pipeline_split(layers, pp, vpp)
                if split is None:
                    continue
                stages = stage_layers(layers, pp, split.get("num_layers_in_first_pipeline_stage"),
                                      split.get("num_layers_in_last_pipeline_stage"),
                                      split.get("account_for_embedding_in_pipeline_split", False),
                                      split.get("account_for_loss_in_pipeline_split", False))
                assert sum(stages) == layers and len(stages) == pp, (layers, pp, vpp, split)


def test_validation_proposes_the_split_tune_would_place():
    cfg, d = typed("cluster=h100", "model=llama3_405b", "cluster.nodes=16", "parallel.tp=8", "parallel.pp=16")
    from launch.config.rules import pipeline_split as rule

    (problem,) = rule(cfg, d)
    proposed = uneven_split(126, 16, 1)
    assert all(key in problem.fix for key in proposed)


def test_submit_and_the_trainer_agree_on_which_stages_train(tmp_path):
    """One answer (config.stages.trains): submit refuses an RLHF job on Megatron-Core, and the node would refuse it
    as not built."""
    import pytest

    from launch.errors import UserError
    from launch.record.read import RunConfig
    from launch.train.preflight import ENGINES, EXIT_NOT_BUILT, preflight
    from launch.verbs.submit import check_submittable

    for backend in ("deepspeed", "megatron"):
        for stage, built in (("sft", True), ("dpo", True), ("rlhf", backend == "deepspeed")):
            cfg, d = typed(f"backend={backend}", f"stage={stage}", "stage.from_scratch=true", "data=tiny_chat")
            assert trains(cfg.stage.kind, cfg.backend.name) is built
            if built:
                continue
            with pytest.raises(UserError, match="not built"):
                check_submittable(cfg, tmp_path)
            problem, code, _ = preflight(tmp_path, RunConfig(cfg, {}, d), ENGINES[cfg.backend.name])
            assert code == EXIT_NOT_BUILT and "does not train this stage" in problem
