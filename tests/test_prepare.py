"""``trainctl prepare``: the shipped tiny_mix tokenized into real megatron-core indexed shards, re-runs that
skip or rebuild exactly what they should, bad input as UserErrors, and the epochs report.

Everything is real: Hugging Face ``datasets`` and ``tokenizers``, megatron-core's ``IndexedDatasetBuilder``
writing the shards and its ``IndexedDataset`` / ``GPTDataset`` reading them back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import derive
from launch.config.compose import compose, compose_config
from launch.data.command import run_prepare
from launch.data.prepare import MAX_EPOCHS, PROCS_ENV, REPORT, mixture_figures
from launch.data.shard import paths
from launch.errors import UserError
from tests.conftest import ROOT, run_trainctl

pytest.importorskip("datasets")
pytest.importorskip("tokenizers")
pytest.importorskip("megatron.core")

SAMPLE = ROOT / "data" / "sample"
TOKENIZER = SAMPLE / "tokenizer.json"
SOURCES = {"prose": SAMPLE / "prose.jsonl", "code": SAMPLE / "code.jsonl"}
EOD = 0
"""<|endoftext|> in data/sample/tokenizer.json."""


def prepare(out: Path, *overrides: str, run_dir: Path | None = None) -> dict:
    """Run ``trainctl prepare recipe=tiny_local data.prepared_dir=OUT OVERRIDES`` in-process; prepare.json."""
    run_prepare(compose(["recipe=tiny_local", f"data.prepared_dir={out}", *overrides]),
                run_dir or out.parent / "run", ["trainctl", "prepare"])
    return json.loads((out / REPORT).read_text())


def mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.iterdir()) if p.suffix in (".bin", ".idx", ".json")
            and p.name != REPORT}


def indexed(prefix: Path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(str(prefix))


def copy_sources(tmp: Path) -> list[str]:
    """The sample sources copied into ``tmp`` (to change them); the overrides that point the mixture there."""
    tmp.mkdir(parents=True, exist_ok=True)
    for name, src in SOURCES.items():
        shutil.copy2(src, tmp / src.name)
    return [f"data.sources.{name}.path={tmp / src.name}" for name, src in SOURCES.items()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict, str]:
    """The shipped tiny_mix prepared once: (prepared_dir, prepare.json, what it printed)."""
    out = tmp_path_factory.mktemp("prepared") / "shards"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        report = prepare(out)
    return out, report, buffer.getvalue()


# ---- the shards ---------------------------------------------------------------------------

def test_each_source_becomes_a_megatron_indexed_dataset(prepared):
    from tokenizers import Tokenizer

    out, report, printed = prepared
    tok = Tokenizer.from_file(str(TOKENIZER))
    for name, src in SOURCES.items():
        p = paths(out, name)
        assert p["bin"].is_file() and p["idx"].is_file() and p["json"].is_file()
        ds = indexed(out / name)
        lines = src.read_text().splitlines()
        assert len(ds) == len(lines)  # one sequence per document
        assert list(ds.document_indices) == list(range(len(lines) + 1))  # and one document per sequence
        assert ds.index.dtype.__name__ == "uint16"  # vocab 4096 < 65500: megatron's optimal_dtype
        first = ds[0]
        assert first[-1] == EOD and EOD not in first[:-1]
        assert tok.decode(first[:-1].tolist()) == json.loads(lines[0])["text"]
        assert all(ds[i][-1] == EOD for i in range(len(ds)))
        manifest = json.loads(p["json"].read_text())
        assert manifest["documents"] == len(lines) and manifest["tokens"] == int(ds.sequence_lengths.sum())
        assert manifest["eod_token"] == "<|endoftext|>" and manifest["eod_id"] == EOD
        assert manifest["source"]["path"] == str(src) and manifest["source"]["files"][0]["size"] == src.stat().st_size
        assert report["sources"][name]["status"] == "built"
        assert f"{name}: building (no manifest)" in printed
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files or caches left
    assert json.loads((out.parent / "run" / REPORT).read_text()) == report


def test_the_shards_feed_megatron_cores_blended_gpt_dataset(prepared):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    class SampleTokenizer:  # what GPTDataset reads of a tokenizer: the ids of data/sample/tokenizer.json
        eod, pad, vocab_size, unique_identifiers = EOD, 1, 4096, {"class": "sample"}

    out, _, _ = prepared
    config = GPTDatasetConfig(random_seed=1, sequence_length=64, split="90,5,5", tokenizer=SampleTokenizer(),
                              blend=([str(out / "prose"), str(out / "code")], [0.7, 0.3]), path_to_cache=None,
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                              mid_level_dataset_surplus=0.005)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [100, 10, 10], lambda: True, config).build()
    assert len(train) == 100 and train[0]["tokens"].shape == (64,)
    assert sum(int(i) for i in train.dataset_index[:100] == 0) == 70  # the blend is exact: 70 / 30


# ---- re-runs ------------------------------------------------------------------------------

def test_a_second_run_skips_finished_shards(prepared, capsys):
    out, first, _ = prepared
    before = mtimes(out)
    again = prepare(out)
    printed = capsys.readouterr().out
    assert mtimes(out) == before
    for name in SOURCES:
        assert f"{name}: skipped" in printed and again["sources"][name]["status"] == "skipped"
        assert {k: v for k, v in again["sources"][name].items() if k != "status"} == \
               {k: v for k, v in first["sources"][name].items() if k != "status"}


def test_a_changed_source_rebuilds_only_that_shard(tmp_path: Path, capsys):
    out, data = tmp_path / "out", tmp_path / "data"
    overrides = copy_sources(data)
    prepare(out, *overrides)
    before = mtimes(out)
    with open(data / "prose.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    capsys.readouterr()
    report = prepare(out, *overrides)
    printed = capsys.readouterr().out
    after = mtimes(out)
    assert "prose: building (source changed)" in printed and "code: skipped" in printed
    assert all(after[f"code.{k}"] == before[f"code.{k}"] for k in ("bin", "idx", "json"))
    assert all(after[f"prose.{k}"] != before[f"prose.{k}"] for k in ("bin", "idx", "json"))
    lines = len((data / "prose.jsonl").read_text().splitlines())
    assert report["sources"]["prose"]["documents"] == lines == len(indexed(out / "prose"))


def test_an_unfinished_shard_is_rebuilt_not_trusted(tmp_path: Path, capsys):
    out, data = tmp_path / "out", tmp_path / "data"
    overrides = copy_sources(data)
    prepare(out, *overrides)
    good = paths(out, "prose")["bin"].read_bytes()
    # an interrupted build: a leftover temp file, the manifest not yet written, a truncated .bin
    leftover = out / ".prose.tmp-12345-deadbeef.bin"
    leftover.write_bytes(b"partial")
    paths(out, "prose")["json"].unlink()
    paths(out, "prose")["bin"].write_bytes(good[:100])
    # and a shard whose .bin was replaced after its manifest was written
    paths(out, "code")["bin"].write_bytes(b"\0" * 10)
    capsys.readouterr()
    prepare(out, *overrides)
    printed = capsys.readouterr().out
    assert "prose: building (no manifest (unfinished shard))" in printed
    assert "code: building (.bin size does not match the manifest)" in printed
    assert not leftover.exists()
    assert paths(out, "prose")["bin"].read_bytes() == good
    assert len(indexed(out / "code")) == len(SOURCES["code"].read_text().splitlines())


def test_a_different_tokenizer_file_rebuilds_every_shard(tmp_path: Path, prepared, capsys):
    out = tmp_path / "out"
    shutil.copytree(prepared[0], out)
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(TOKENIZER.read_text()), indent=1))  # same tokens, other bytes
    capsys.readouterr()
    prepare(out, f"data.tokenizer={tokenizer}")
    printed = capsys.readouterr().out
    assert all(f"{name}: building (tokenizer changed)" in printed for name in SOURCES)


def test_several_processes_write_the_same_shard_as_one(tmp_path: Path, prepared, monkeypatch):
    monkeypatch.setenv(PROCS_ENV, "1")
    prepare(tmp_path / "one")
    monkeypatch.setenv(PROCS_ENV, "3")
    prepare(tmp_path / "three")
    for name in SOURCES:
        one, three = paths(tmp_path / "one", name), paths(tmp_path / "three", name)
        assert one["bin"].read_bytes() == three["bin"].read_bytes() == paths(prepared[0], name)["bin"].read_bytes()
        assert one["idx"].read_bytes() == three["idx"].read_bytes()
        assert json.loads(one["json"].read_text())["processes"] == 1
        assert json.loads(three["json"].read_text())["processes"] == 3


def test_txt_and_parquet_sources_in_directories(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [json.loads(line)["text"] for line in SOURCES["prose"].read_text().splitlines()[:5]]
    (tmp_path / "txt" / "sub").mkdir(parents=True)
    for i, text in enumerate(texts):  # a .txt file is one document
        (tmp_path / "txt" / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(text)
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"body": texts[:3]}), tmp_path / "pq" / "a.parquet")
    pq.write_table(pa.table({"body": texts[3:]}), tmp_path / "pq" / "b.parquet")
    report = prepare(tmp_path / "out", f"data.sources.prose.path={tmp_path / 'txt'}",
                     f"data.sources.code.path={tmp_path / 'pq'}", "data.sources.code.text_key=body")
    txt, pq = report["sources"]["prose"], report["sources"]["code"]
    assert txt["documents"] == pq["documents"] == 5 and txt["tokens"] == pq["tokens"]


def test_a_large_vocabulary_is_written_as_int32(tmp_path: Path, capsys):
    """65,500 entries or more: megatron-core's optimal_dtype is int32, and ids above 65,535 survive."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000, "</s>": 70_001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.jsonl").write_text('{"text": "w69999 w1 w65535"}\n{"text": ""}\n')
    report = prepare(tmp_path / "out", f"data.tokenizer={tmp_path / 'tokenizer.json'}",
                     f"data.sources.prose.path={tmp_path / 'a.jsonl'}", f"data.sources.code.path={tmp_path / 'a.jsonl'}")
    assert report["sources"]["prose"]["dtype"] == "int32" and report["tokenizer_vocab_size"] == 70_002
    assert "data.tokenizer has 70,002 tokens, more than model.vocab_size=4,096" in capsys.readouterr().out
    ds = indexed(tmp_path / "out" / "prose")
    assert ds.index.dtype.__name__ == "int32"
    assert ds[0].tolist() == [69999, 1, 65535, 70_001] and ds[1].tolist() == [70_001]  # an empty document: EOD only


# ---- bad input ----------------------------------------------------------------------------

def test_prepared_dir_inside_a_source_directory_is_refused(tmp_path: Path):
    (tmp_path / "src").mkdir()
    shutil.copy2(SOURCES["code"], tmp_path / "src")
    with pytest.raises(UserError, match=r"data.prepared_dir=.*inside data.sources.code.path="):
        prepare(tmp_path / "src" / "shards", f"data.sources.code.path={tmp_path / 'src'}")


def test_a_missing_source_path_names_its_key(tmp_path: Path):
    with pytest.raises(UserError) as err:
        prepare(tmp_path / "out", f"data.sources.prose.path={tmp_path / 'nope.jsonl'}")
    message = str(err.value)
    assert f"data.sources.prose.path={tmp_path / 'nope.jsonl'}" in message and "no such file" in message
    assert "fix:" in message and len(err.value.problems) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_a_missing_tokenizer_names_data_tokenizer(tmp_path: Path):
    with pytest.raises(UserError) as err:
        prepare(tmp_path / "out", f"data.tokenizer={tmp_path / 'tok.json'}")
    assert f"data.tokenizer={tmp_path / 'tok.json'}: no such file" in str(err.value) and "fix:" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_without_an_end_of_document_token_names_data_tokenizer(tmp_path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError) as err:
        prepare(tmp_path / "out", f"data.tokenizer={tmp_path / 'tokenizer.json'}")
    assert "data.tokenizer=" in str(err.value) and "no end-of-document token" in str(err.value)
    # a tokenizer_config.json beside it that names the eos_token is what transformers would use
    tok.add_special_tokens(["<|eot|>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|eot|>"}}))
    from launch.data.tokenizer import inspect

    info = inspect(tmp_path / "tokenizer.json")
    assert (info.eod_token, info.eod_id, info.dtype_name) == ("<|eot|>", 3, "uint16")
    (tmp_path / "tokenizer_config.json").unlink()
    assert inspect(tmp_path / "tokenizer.json").eod_token == "</s>"


def test_a_wrong_text_key_names_its_key(tmp_path: Path):
    with pytest.raises(UserError) as err:
        prepare(tmp_path / "out", "data.sources.code.text_key=content")
    assert "data.sources.code.text_key=content: no column 'content'; the source has text" in str(err.value)


def test_a_bad_process_count_names_the_variable(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(PROCS_ENV, "zero")
    with pytest.raises(UserError, match=f"{PROCS_ENV}='zero'"):
        prepare(tmp_path / "out")


# ---- the report ---------------------------------------------------------------------------

def test_epochs_follow_the_runs_token_budget(tmp_path: Path, prepared, capsys):
    out = tmp_path / "out"
    shutil.copytree(prepared[0], out)
    steps = 2000
    budget = derive(compose_config(["recipe=tiny_local", f"train.steps={steps}"])).tokens
    assert budget == steps * 8 * 256  # global batch 8 x 256-token sequences
    report = prepare(out, f"train.steps={steps}")
    printed = capsys.readouterr().out
    assert report["train_tokens"] == budget
    for name, weight in (("prose", 0.7), ("code", 0.3)):
        tokens = json.loads(paths(out, name)["json"].read_text())["tokens"]
        figures = report["sources"][name]
        assert figures["share"] == pytest.approx(weight)
        assert figures["epochs"] == pytest.approx(weight * budget / tokens)
        assert figures["epochs"] > MAX_EPOCHS and figures["over_max_epochs"]  # 4.1M tokens: over 4 epochs
    assert "> 4 epochs" in printed and f"{report['sources']['prose']['epochs']:.3g}" in printed
    # the default 20 steps read each source less than once: nothing flagged
    small = prepare(out)
    assert not any(f["over_max_epochs"] for f in small["sources"].values())


def test_mixture_figures_normalise_weights():
    shards = {"a": {"documents": 10, "tokens": 1000}, "b": {"documents": 5, "tokens": 100}, "c": {"documents": 0,
                                                                                                  "tokens": 0}}
    figures = mixture_figures(shards, {"a": 3.0, "b": 1.0, "c": 1.0}, train_tokens=1000)
    assert figures["a"]["share"] == pytest.approx(0.6) and figures["a"]["epochs"] == pytest.approx(0.6)
    assert figures["b"]["epochs"] == pytest.approx(2.0) and not figures["b"]["over_max_epochs"]
    assert figures["c"]["epochs"] is None and figures["c"]["over_max_epochs"]


# ---- the login path -----------------------------------------------------------------------

def test_importing_prepare_imports_nothing_heavy():
    code = ("import sys, launch.data, launch.data.prepare, launch.data.command, launch.data.array, launch.data.shard, launch.data.sources, "
            "launch.data.tokenizer; heavy = [m for m in ('torch', 'megatron', 'datasets', 'tokenizers', 'numpy') "
            "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert out.returncode == 0, out.stdout + out.stderr


def test_through_the_cli(workdir: Path):
    out = run_trainctl("prepare", "recipe=tiny_local", "data.prepared_dir=shards", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert (workdir / "shards" / "prose.bin").is_file() and (workdir / "runs/tiny_local" / REPORT).is_file()
    again = run_trainctl("prepare", "recipe=tiny_local", "data.prepared_dir=shards", cwd=workdir)
    assert again.returncode == 0 and "prose: skipped" in again.stdout
    bad = run_trainctl("prepare", "recipe=tiny_local", "data.sources.code.path=missing.jsonl",
                       "name=bad", cwd=workdir)
    assert bad.returncode == 2 and "data.sources.code.path=missing.jsonl" in bad.stderr
    assert "Traceback" not in bad.stderr and not (workdir / "runs/bad").exists()


def test_prepare_on_slurm_needs_a_slurm_cluster_and_a_known_value(workdir: Path):
    out = run_trainctl("prepare", "recipe=tiny_local", "data.prepare_on=slurm", cwd=workdir)
    assert out.returncode == 2 and "data.prepare_on=slurm, cluster=local" in out.stderr and "fix:" in out.stderr
    out = run_trainctl("prepare", "recipe=tiny_local", "data.prepare_on=elsewhere", cwd=workdir)
    assert out.returncode == 2 and "data.prepare_on: Invalid value 'elsewhere', expected one of [here, slurm]" in out.stderr
    assert "Traceback" not in out.stderr and not (workdir / "runs/tiny_local").exists()
