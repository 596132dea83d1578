"""SFT on chat data (launch/train/chat.py): the prompt mask, padding, the cut, the blend, and a real
2-process run of recipe=tiny_sft on each backend (DeepSpeed ZeRO-3; Megatron-Core dp 2), no prepare step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PYTHONPATH, ROOT, run_trainctl, typed

TOKENIZER = str(ROOT / "data/sample/tokenizer.json")
CHAT = ROOT / "data/sample/chat.jsonl"
EOS = "<|endoftext|>"
STEPS = 6
TALK = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What does textwrap.fill do?"},
        {"role": "assistant", "content": "It wraps a paragraph to a width."},
        {"role": "user", "content": "And dedent?"},
        {"role": "assistant", "content": "It removes common leading whitespace."}]


def _encoder(seq_length: int = 256, mask_prompt: bool = True):
    from launch.train.chat import ChatEncoder

    return ChatEncoder(TOKENIZER, seq_length=seq_length, mask_prompt=mask_prompt)


def _spans(sample) -> list[list[int]]:
    """The label ids of each run of loss_mask == 1."""
    spans, current = [], []
    for label, keep in zip(sample["labels"].tolist(), sample["loss_mask"].tolist()):
        if keep:
            current.append(label)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def _replies(messages) -> list[str]:
    return [m["content"] + EOS for m in messages if m["role"] == "assistant"]


# --- samples ----------------------------------------------------------------------------------

def test_the_mask_is_exactly_the_assistant_replies():
    enc = _encoder()
    sample = enc(TALK)
    assert {k: tuple(v.shape) for k, v in sample.items()} == {k: (256,) for k in
                                                              ("tokens", "labels", "loss_mask", "position_ids")}
    assert (sample["tokens"][1:] == sample["labels"][:-1]).all()  # GPTDataset's shift
    assert [enc.tokenizer.decode(s) for s in _spans(sample)] == _replies(TALK)
    assert enc.template_source.startswith("trainctl's default")
    # Every shipped conversation: what the loss sees is the replies, in order, and nothing else.
    for line in CHAT.read_text().splitlines():
        messages = json.loads(line)["messages"]
        assert [enc.tokenizer.decode(s) for s in _spans(enc(messages))] == _replies(messages)


def test_padding_is_masked_and_mask_prompt_false_trains_on_the_whole_conversation():
    enc = _encoder()
    ids, _ = enc.ids_and_mask(TALK)
    sample = enc(TALK)
    n = len(ids)  # positions n-1.. of the labels are padding
    assert n < 200
    assert sample["tokens"][:n].tolist() == ids[:n] and set(sample["tokens"][n:].tolist()) == {enc.eod}
    assert sample["loss_mask"][n - 1:].sum() == 0
    whole = _encoder(mask_prompt=False)(TALK)
    assert whole["loss_mask"][:n - 1].tolist() == [1.0] * (n - 1) and whole["loss_mask"][n - 1:].sum() == 0


def test_a_long_conversation_is_cut_at_the_end():
    enc = _encoder()
    ids, assistant = enc.ids_and_mask(TALK)
    first_reply = assistant.index(1)
    short = _encoder(seq_length=first_reply + 3)  # the cut falls 4 tokens into the first reply
    sample = short(TALK)
    assert sample["tokens"].tolist() == ids[:first_reply + 3] and sample["labels"].tolist() == ids[1:first_reply + 4]
    assert sample["loss_mask"].sum() == 4
    assert short.tokenizer.decode(_spans(sample)[0]) == enc.tokenizer.decode(ids[first_reply:first_reply + 4])
    # A reply that starts past the cut trains nothing.
    assert _encoder(seq_length=first_reply - 1)(TALK)["loss_mask"].sum() == 0


def test_the_template_is_the_tokenizers_own_when_it_marks_generation(tmp_path):
    from launch.train.chat import DEFAULT_TEMPLATE, ChatEncoder, chat_template

    (tmp_path / "tokenizer.json").write_bytes(Path(TOKENIZER).read_bytes())
    assert chat_template(str(tmp_path / "tokenizer.json"))[0] == DEFAULT_TEMPLATE
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": plain}))
    assert chat_template(str(tmp_path / "tokenizer.json"))[0] == DEFAULT_TEMPLATE  # no generation tags
    marked = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
              "{% endgeneration %}{% else %}[{{ m['content'] }}]{% endif %}{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": marked}))
    template, source = chat_template(str(tmp_path / "tokenizer.json"))
    assert template == marked and source.endswith("tokenizer_config.json")
    enc = ChatEncoder(str(tmp_path / "tokenizer.json"), seq_length=128)
    assert [enc.tokenizer.decode(s) for s in _spans(enc(TALK))] == [m[:-len(EOS)] for m in _replies(TALK)]


# --- the mixture ------------------------------------------------------------------------------

def _two_sources(tmp_path: Path, *extra: str):
    from launch.config.schema import DataSource

    lines = CHAT.read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[0::2]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[1::2]) + "\n")
    cfg, _ = typed("recipe=tiny_sft", f"data.sources.chat.path={tmp_path / 'a.jsonl'}", "data.sources.chat.weight=0.7",
                   *extra)
    # A second source (Hydra cannot add a key to data.sources from the command line: OmegaConf refuses a
    # dict for a dataclass-typed value), on the typed config.
    cfg.data.sources["more"] = DataSource(path=str(tmp_path / "b.jsonl"), weight=0.3, text_key="messages")
    return cfg, lines


def test_the_blend_meets_the_weights_and_the_split_and_order_are_seeded(tmp_path):
    import numpy as np

    from launch.train.chat import build_chat_datasets

    cfg, lines = _two_sources(tmp_path)
    data = build_chat_datasets(cfg, train_samples=1000, valid_samples=16, cache_dir=tmp_path / "cache")
    assert np.bincount(np.asarray(data.train.dataset_index[:1000]), minlength=2).tolist() == [700, 300]
    a, b = data.train.datasets
    assert (a.begin, a.begin + a.count, b.begin, b.begin + b.count) == (0, 135, 0, 135)  # 90% of 150 each
    assert (data.valid.datasets[0].begin, data.valid.datasets[0].count) == (135, 7)  # [135, round(142.5))
    # Source a's train samples are its first 135 conversations, each once per epoch.
    a_lines = lines[0::2]
    first_epoch = [a.conversation(i) for i in range(135)]
    assert sorted(json.dumps({"messages": m}) for m in first_epoch) == sorted(a_lines[:135])
    # Deterministic given train.seed; another seed, another order.
    same = build_chat_datasets(cfg, train_samples=1000, valid_samples=16, cache_dir=tmp_path / "cache")
    assert all((same.train[i]["tokens"] == data.train[i]["tokens"]).all() for i in range(8))
    other, _ = _two_sources(tmp_path, "train.seed=7")
    moved = build_chat_datasets(other, train_samples=1000, valid_samples=16, cache_dir=tmp_path / "cache")
    assert any((moved.train[i]["tokens"] != data.train[i]["tokens"]).any() for i in range(8))


def test_a_missing_chat_file_is_named(tmp_path):
    from launch.train.data import MissingData, check_data

    cfg, _ = typed("recipe=tiny_sft", f"data.sources.chat.path={tmp_path / 'none.jsonl'}")
    with pytest.raises(MissingData, match="none.jsonl.*no `trainctl prepare` needed"):
        check_data(cfg)


# --- real runs --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["deepspeed", "megatron"])
def test_tiny_sft_trains_on_two_processes(tmp_path, backend):
    """No shards anywhere (no prepare): the run reads data/sample/chat.jsonl, and its loss falls."""
    out = run_trainctl("render", "recipe=tiny_sft", f"backend={backend}", f"train.steps={STEPS}",
                       "train.eval_interval=3", "train.eval_iters=1", f"data.prepared_dir={tmp_path / 'none'}",
                       cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = tmp_path / "runs/tiny_sft"
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "launch.train", str(run_dir)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.5, losses
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]
    assert (run_dir / "checkpoints/final").is_dir()
