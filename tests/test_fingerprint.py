"""The weights fingerprint a stage's export writes and the next stage's trainer checks (launch/record/fingerprint.py)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from launch.record import checkpoints as ckpt
from launch.record import fingerprint


def test_an_export_and_the_model_that_loaded_it_agree_and_any_change_shows(tmp_path):
    tmp, final = tmp_path / ".tmp_final", tmp_path / "final"
    tmp.mkdir()
    weights = {"embed.weight": torch.randn(4, 3), "norm.weight": torch.ones(3, dtype=torch.bfloat16)}
    save_file(weights, str(tmp / "model.safetensors"))
    ckpt.publish_final(tmp, final, {"step": 7})
    exported = json.loads((final / ckpt.MARKER).read_text())["weights_sha256"]
    assert not tmp.exists() and exported == fingerprint.of_directory(final)

    loaded = {"embed.weight": weights["embed.weight"].clone(), "norm.weight": torch.ones(3),  # fp32 in memory
              "lm_head.weight": weights["embed.weight"]}  # tied: not in the files, left out
    assert fingerprint.of_model(loaded, final) == exported
    loaded["embed.weight"][0, 0] = torch.nextafter(loaded["embed.weight"][0, 0], torch.tensor(1.0))
    assert fingerprint.of_model(loaded, final) != exported  # one ulp
    assert fingerprint.of_model({"norm.weight": torch.ones(3)}, final) is None  # a tensor the model lacks
