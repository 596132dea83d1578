"""One source -> ``{source}.bin`` + ``{source}.idx`` (Megatron indexed dataset) + ``{source}.json`` (manifest).

Loading: Hugging Face ``datasets``' packaged builders (``json``, ``parquet``,
``text``) on local files only, offline, with their Arrow cache in a temporary
folder inside the output directory (same filesystem and space as the shards;
never ``~/.cache``), removed afterwards. A ``.txt`` file is one document
(``sample_by="document"``), its column is ``text`` whatever ``text_key`` says.

Tokenizing: ``Dataset.map(num_proc=N)``, each process with its own tokenizer,
one core each (``Tokenizer.encode`` per document, no Rayon threads inside the
processes). Each document is encoded with the tokenizer's own template
(``add_special_tokens``: Llama 3's BOS, for instance, as Megatron-LM's
``preprocess_data.py`` does through ``transformers``) and ends with the EOD
token, appended unless the template already put it there.

Writing: megatron-core's ``IndexedDatasetBuilder``, one sequence per document
(``add_document(ids, [len(ids)])``: one item, then the document boundary, as
``add_item`` + ``end_document`` but without building a torch tensor per document).
megatron-core's ``indexed_dataset`` imports torch (and megatron.core's
``__init__`` much more); that is acceptable here, since ``prepare`` runs where the
data is, with the ``train`` extras, never on the plan/submit path.

Finished means: the manifest exists and matches the source's current
fingerprint and the tokenizer's sha256, and the ``.bin`` holds exactly the
manifest's tokens. So the build writes to temporary names in the output
directory, removes the old manifest, renames ``.bin`` then ``.idx`` into place
and writes the manifest LAST; an interrupted build leaves no manifest (or a
stale one), and the next run rebuilds. One ``prepare`` per output directory at a
time: a second one would remove the first one's temporary files.

Not built: one SLURM array task per shard (``trainctl prepare`` on a cluster
submitting a job array whose tasks each build one source); sources are built
one after another here, each with ``N`` processes.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
import uuid
from functools import lru_cache
from pathlib import Path

from launch.data.sources import Source, total_bytes
from launch.data.tokenizer import TokenizerInfo

MANIFEST_VERSION = 1
"""Bump when the shard layout or tokenization changes: older manifests then no longer match."""
MIN_DOCS_PER_PROC = 64
"""Fewer documents per process than this and starting the process costs more than it saves."""
WRITE_BATCH = 4096
"""Documents per Arrow batch read back while writing the .bin."""


# ---- finished or not --------------------------------------------------------------------

def paths(out_dir: Path, name: str) -> dict[str, Path]:
    return {kind: out_dir / f"{name}.{kind}" for kind in ("bin", "idx", "json")}


def read_manifest(out_dir: Path, name: str) -> dict | None:
    try:
        return json.loads(paths(out_dir, name)["json"].read_text())
    except (OSError, ValueError):
        return None


def stale_reason(manifest: dict | None, out_dir: Path, name: str, fp: dict, tokenizer_sha256: str) -> str | None:
    """Why the shard ``name`` must be (re)built, or None when it is finished and current."""
    if manifest is None:
        return "no manifest" if not paths(out_dir, name)["bin"].exists() else "no manifest (unfinished shard)"
    if manifest.get("version") != MANIFEST_VERSION:
        return f"manifest version {manifest.get('version')} != {MANIFEST_VERSION}"
    if manifest.get("tokenizer_sha256") != tokenizer_sha256:
        return "tokenizer changed"
    if manifest.get("source") != fp:
        return "source changed"
    p = paths(out_dir, name)
    if not (p["bin"].is_file() and p["idx"].is_file()):
        return ".bin or .idx missing"
    if p["bin"].stat().st_size != manifest.get("tokens", -1) * manifest.get("itemsize", 0):
        return ".bin size does not match the manifest"
    return None


# ---- tokenizing (runs in the map's worker processes) ------------------------------------

@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def encode_batch(batch: dict, text_key: str, tokenizer_path: str, eod_id: int, dtype: str) -> dict:
    """{"ids": one array per document: its tokens, EOD last}. Module-level so worker processes can pickle it."""
    import numpy

    tok = _tokenizer(tokenizer_path)
    out = []
    for text in batch[text_key]:
        ids = tok.encode(text or "").ids
        if not ids or ids[-1] != eod_id:
            ids.append(eod_id)
        out.append(numpy.asarray(ids, dtype=dtype))
    return {"ids": out}


# ---- one source -------------------------------------------------------------------------

def import_datasets():
    """``datasets``, offline and with progress bars only on a terminal (set before import: it reads env once)."""
    import sys

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    if sys.stderr.isatty():
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
    return datasets


def load_source(source: Source, cache_dir: Path, procs: int):
    """The source as a ``datasets.Dataset`` with a text column; raises ValueError naming the problem."""
    datasets = import_datasets()
    kwargs = {"sample_by": "document"} if source.builder == "text" else {}
    try:
        ds = datasets.load_dataset(source.builder, data_files=[str(f) for f in source.files], split="train",
                                   cache_dir=str(cache_dir), num_proc=min(procs, len(source.files)) if procs > 1
                                   and len(source.files) > 1 else None, **kwargs)
    except Exception as exc:  # noqa: BLE001 - datasets/pyarrow raise many types for an unreadable file
        raise ValueError(f"could not read it as {source.builder}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                         if str(exc) else f"could not read it as {source.builder}: {exc!r}") from exc
    return ds


def text_column(ds, source: Source) -> str:
    """The column holding the documents' text; raises KeyError/TypeError with the reason."""
    key = "text" if source.builder == "text" else source.text_key
    if key not in ds.column_names:
        raise KeyError(f"no column {key!r}; the source has {', '.join(ds.column_names) or 'no columns'}")
    dtype = getattr(ds.features[key], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise TypeError(f"column {key!r} holds {ds.features[key]}, not text; prepare tokenizes plain text "
                        "(chat messages need a chat template, which is not built)")
    return key


def tokenize(ds, key: str, tok: TokenizerInfo, procs: int):
    """The dataset mapped to one ``ids`` array per document, in document order."""
    procs = max(1, min(procs, len(ds) // MIN_DOCS_PER_PROC))
    return ds.map(encode_batch, batched=True, batch_size=256, num_proc=procs if procs > 1 else None,
                  remove_columns=ds.column_names, load_from_cache_file=False, desc="tokenizing",
                  fn_kwargs={"text_key": key, "tokenizer_path": str(tok.path), "eod_id": tok.eod_id,
                             "dtype": tok.dtype_name}), procs


def import_builder():
    """megatron-core's IndexedDatasetBuilder, imported quietly.

    Importing it runs megatron.core's ``__init__``, which warns that Transformer
    Engine and Apex are missing and logs Megatron-FSDP notices at INFO (to stdout
    under trainctl's logging): none of it concerns writing a shard.
    """
    import contextlib
    import io
    import logging
    import warnings

    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    finally:
        logging.disable(previous)
    return IndexedDatasetBuilder


def write_shard(ids, prefix: Path, dtype_name: str, progress=None) -> tuple[int, int]:
    """Write ``prefix``.bin/.idx from the ``ids`` column; (documents, tokens). ``progress(done, total)`` per batch."""
    import numpy

    IndexedDatasetBuilder = import_builder()
    dtype = numpy.dtype(dtype_name).type
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    documents = tokens = 0
    for table in ids.with_format("arrow").iter(batch_size=WRITE_BATCH):
        column = table.column("ids").combine_chunks()
        offsets = column.offsets.to_numpy()
        values = column.flatten().to_numpy()
        offsets = offsets - offsets[0]
        for a, b in zip(offsets[:-1], offsets[1:]):
            builder.add_document(values[a:b], [int(b - a)])
        documents += len(column)
        tokens += len(values)
        if progress is not None:
            progress(documents, len(ids))
    builder.finalize(str(prefix) + ".idx")
    return documents, tokens


def build(source: Source, fp: dict, tok: TokenizerInfo, tokenizer_sha256: str, out_dir: Path, procs: int,
          progress=None) -> dict:
    """Build the shard of ``source`` in ``out_dir`` and return its manifest (written last).

    ``fp`` is the source's fingerprint taken before reading it: a source that
    changes during the build then no longer matches, and is rebuilt next time.
    """
    remove_leftovers(out_dir, source.name)
    tag = f".{source.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    prefix, cache = out_dir / tag, out_dir / f"{tag}.cache"
    start = time.perf_counter()
    try:
        ds = load_source(source, cache, procs)
        ids, used = tokenize(ds, text_column(ds, source), tok, procs)
        documents, tokens = write_shard(ids, prefix, tok.dtype_name, progress)
        del ids, ds
        manifest = {
            "version": MANIFEST_VERSION,
            "name": source.name,
            "source": fp,
            "source_bytes": total_bytes(fp),
            "tokenizer": str(tok.path),
            "tokenizer_sha256": tokenizer_sha256,
            "eod_token": tok.eod_token,
            "eod_id": tok.eod_id,
            "dtype": tok.dtype_name,
            "itemsize": 2 if tok.dtype_name == "uint16" else 4,
            "documents": documents,
            "tokens": tokens,
            "processes": used,
            "seconds": round(time.perf_counter() - start, 3),
        }
        publish(out_dir, source.name, prefix, manifest)
        return manifest
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        for suffix in (".bin", ".idx"):
            Path(str(prefix) + suffix).unlink(missing_ok=True)


def publish(out_dir: Path, name: str, prefix: Path, manifest: dict) -> None:
    """Old manifest out, .bin then .idx renamed into place, manifest in last (all in one directory: atomic renames)."""
    p = paths(out_dir, name)
    p["json"].unlink(missing_ok=True)
    for kind in ("bin", "idx"):
        _fsync(Path(f"{prefix}.{kind}"))
        os.replace(f"{prefix}.{kind}", p[kind])
    write_json_atomic(p["json"], manifest)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_leftovers(out_dir: Path, name: str) -> None:
    """Temporary files and caches an interrupted build of ``name`` left behind."""
    for leftover in glob.glob(str(out_dir / glob.escape(f".{name}.tmp-")) + "*"):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            Path(leftover).unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
