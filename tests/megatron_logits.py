"""Test helper, run as a script: the logits of the Megatron-Core trainer's model, one CPU process.

``python -m tests.megatron_logits RUN_DIR TOKENS.pt INIT,OUT.pt[,EXPORT_DIR] ...``: builds
``MegatronModule`` from the rendered run (its megatron.yaml; torch.cuda redirected to the CPU), then
for each job loads INIT as ``stage.init_checkpoint`` would be loaded (resolved by
``launch.train.init_source``, loaded by ``MegatronModule.init_from``: a Megatron checkpoint or a
Hugging Face import) and saves the logits on TOKENS.pt to OUT.pt; with EXPORT_DIR, also saves a
distributed checkpoint of those weights and exports it there (``MegatronModule.export``: what the
trainer writes into ``final/``). A run directory, not a test: tests/test_hf_convert.py compares
the numbers with transformers.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch
    from megatron.core import dist_checkpointing

    from launch.record.read import read_config, read_plan
    from launch.train.init_source import resolve_init
    from launch.train.preflight import ENGINES

    run_dir, tokens = Path(argv[0]), torch.load(argv[1])
    record = read_config(run_dir)
    engine = ENGINES[record.cfg.backend.name]
    module = engine.build(run_dir, record, read_plan(run_dir))
    chunk = module.built.chunks[0].module
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    for job in argv[2:]:
        init, out, *export = job.split(",")
        source = resolve_init(init, engine.init_formats, engine.name)
        module.init_from(source)
        chunk.eval()
        with torch.no_grad():
            logits = chunk(tokens, positions, None)
        torch.save({"logits": logits, "source": str(source.path), "format": source.format.name}, out)
        if export:
            step, final = Path(export[0] + ".step"), Path(export[0])
            step.mkdir(parents=True)
            # The model's tensors only: this optimizer never stepped (megatron-core cannot save its empty state).
            state = module._state.sharded_state_dict(module.built.chunks, module.built.optimizer, loading=False,
                                                     with_optimizer=False)
            dist_checkpointing.save(state, str(step))
            final.mkdir(parents=True)
            module.export(final, step)
    module.close()
    return 0


if __name__ == "__main__":  # megatron's checkpoint writer may re-import __main__
    raise SystemExit(main(sys.argv[1:]))
