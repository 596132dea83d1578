"""Which stages have a trainer, per backend: the one answer ``submit``, the trainers and the README read.

``plan`` and ``render`` work for every stage a backend translates
(``backend_rules.stage_supported_by_backend`` says which); ``submit`` queues a
training job only for a stage whose trainer exists (``launch/train``), since a
job for any other would wait in the queue and then fail. DPO trains on DeepSpeed
(``launch.train.deepspeed_dpo``) and Megatron-Core (``launch.train.megatron.dpo``); RLHF (GRPO,
RLOO) on DeepSpeed only, through TRL's trainers (``launch.train.rl``).
"""

from __future__ import annotations

from launch.config.schema import BackendName, StageKind

TRAINED: dict[BackendName, frozenset[StageKind]] = {
    BackendName.deepspeed: frozenset({StageKind.pretrain, StageKind.sft, StageKind.dpo, StageKind.rlhf}),
    BackendName.megatron: frozenset({StageKind.pretrain, StageKind.sft, StageKind.dpo}),
}
"""The stages each backend's trainer trains."""


def trains(stage: StageKind, backend: BackendName) -> bool:
    """Whether ``backend``'s trainer trains ``stage``."""
    return stage in TRAINED[backend]
