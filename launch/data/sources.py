"""A source's files and their fingerprint: what decides whether a finished shard is still current.

A source is a file or a directory of files of one format (``.jsonl``/``.json``,
``.parquet`` or ``.txt``). Its fingerprint lists every file with its size and
modification time (ns): cheap to take on terabytes, unlike a content hash, and
any rewrite, append, touch, added or removed file changes it. Standard library
only, so the checks run before anything heavy is imported.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
"""File suffix -> the Hugging Face ``datasets`` packaged builder that reads it."""


@dataclass(frozen=True)
class Source:
    """One mixture source, resolved: its files exist and share one format."""

    name: str
    path: Path
    """Absolute path of the file or directory, as configured."""
    files: tuple[Path, ...]
    builder: str
    """``json``, ``parquet`` or ``text``: the ``datasets`` builder for ``files``."""
    text_key: str
    weight: float


def resolve(name: str, path: str, text_key: str, weight: float) -> Source:
    """The source ``name`` at ``path`` (relative to the current directory); raises ValueError with the reason."""
    where = Path(path).expanduser().absolute()
    if not where.exists():
        raise ValueError("no such file or directory")
    if where.is_dir():
        files = tuple(sorted(p for p in where.rglob("*") if p.is_file() and p.suffix in FORMATS
                             and not any(part.startswith(".") for part in p.relative_to(where).parts)))
        if not files:
            raise ValueError(f"the directory holds no {', '.join(FORMATS)} files")
    else:
        if where.suffix not in FORMATS:
            raise ValueError(f"unsupported file type {where.suffix or '(none)'!r}; prepare reads {', '.join(FORMATS)}")
        files = (where,)
    builders = sorted({FORMATS[f.suffix] for f in files})
    if len(builders) > 1:
        raise ValueError(f"the directory mixes formats ({', '.join(builders)}); keep one format per source")
    return Source(name=name, path=where, files=files, builder=builders[0], text_key=text_key, weight=weight)


def fingerprint(source: Source) -> dict:
    """What the manifest records of the source: its path, the text column, and each file's size and mtime."""
    base = source.path if source.path.is_dir() else source.path.parent
    files = []
    for f in source.files:
        st = f.stat()
        files.append({"path": str(f.relative_to(base)), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"path": str(source.path), "format": source.builder, "text_key": source.text_key, "files": files}


def total_bytes(fp: dict) -> int:
    return sum(f["size"] for f in fp["files"])


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    """The file's sha256 hex digest (the tokenizer's identity: the same file anywhere is the same tokenizer)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
