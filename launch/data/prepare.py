"""``trainctl prepare``: tokenize each source of the data mixture into a Megatron indexed shard.

For every ``data.sources.NAME`` it writes ``{data.prepared_dir}/NAME.bin`` and
``NAME.idx`` (what megatron-core's ``IndexedDataset("{prepared_dir}/NAME")`` and
so ``GPTDataset``/``BlendedMegatronDatasetBuilder`` read), and ``NAME.json``, the
manifest that marks the shard finished (``launch.data.shard``). A re-run skips
every shard whose manifest matches the source's files and the tokenizer; a
relative ``prepared_dir`` (or source path) is relative to the current directory.

The report says, per source, how many times the run will read it: epochs =
weight share x the run's training tokens (``derive(cfg).tokens``) / the source's
tokens. Beyond about 4 epochs, repeated data is worth markedly less than fresh
data (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models"), so
such sources are flagged. The figure counts the whole source; Megatron holds out
``data.split``'s validation and test fractions, so the training split is read
1 / split[0] times more often than that (0.2-11% more at the shipped splits).

Processes: ``TRAINCTL_PREPARE_PROCS``, else the CPUs this process may use (capped
at ``MAX_PROCS``); the schema has no knob for it. Here, sources are built one
after another; with ``data.prepare_on=slurm`` each unfinished source becomes one
task of a job array (``launch.data.array``) and the command returns at once.

The command itself (here, or as a Slurm job array) is ``launch.data.command``;
this module holds the steps both the command and an array task
(``launch.data.array``) run. Heavy imports (``datasets``, ``tokenizers``,
megatron-core, which imports torch) happen inside ``shard``'s builders only.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from launch.data import shard, tokenizer
from launch.data.sources import fingerprint, resolve, sha256
from launch.errors import UserError
from launch.fmt import si

MAX_EPOCHS = 4.0
"""Muennighoff et al. 2023: up to ~4 epochs of repeated data are nearly as good as fresh; returns diminish beyond."""
MAX_PROCS = 32
PROCS_ENV = "TRAINCTL_PREPARE_PROCS"
REPORT = "prepare.json"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


# ---- inputs -----------------------------------------------------------------------------

def check_inputs(data) -> tuple[list, Path]:
    """(resolved sources, tokenizer path) of ``data`` (a DataConfig); every bad input at once as a UserError."""
    found, sources = [], []
    out = Path(data.prepared_dir).expanduser().absolute()
    tok_path = Path(data.tokenizer).expanduser().absolute()
    if not tok_path.is_file():
        found.append(f"data.tokenizer={data.tokenizer}: no such file ({tok_path})\n"
                     "  fix: data.tokenizer=/path/to/tokenizer.json (a Hugging Face tokenizers file), "
                     "e.g. the shipped data/sample/tokenizer.json")
    if not data.sources:
        found.append("data.sources={}: the mixture has no sources\n  fix: data=tiny_mix, or a data/ config "
                     "of your own with sources (conf/data/tiny_mix.yaml shows the shape)")
    for name, src in data.sources.items():
        key = f"data.sources.{name}"
        if not _NAME.fullmatch(name) or name == REPORT.removesuffix(".json"):
            found.append(f"{key}: the name {name!r} cannot name a shard file\n  fix: use letters, digits, _ . - "
                         f"(not starting with . and not {REPORT.removesuffix('.json')!r})")
        if not (src.weight > 0 and math.isfinite(src.weight)):
            found.append(f"{key}.weight={src.weight}: mixture weights must be positive\n"
                         f"  fix: {key}.weight=0.1, or remove the source with ~{key}")
        try:
            sources.append(resolve(name, src.path, src.text_key, src.weight))
            if sources[-1].path.is_dir() and out.is_relative_to(sources[-1].path):
                found.append(f"data.prepared_dir={data.prepared_dir}: inside {key}.path={src.path}; the shards' "
                             f".json manifests would be read as data\n  fix: data.prepared_dir=<a directory "
                             "outside the sources>")
        except ValueError as exc:
            found.append(f"{key}.path={src.path}: {exc} ({Path(src.path).expanduser().absolute()})\n"
                         f"  fix: {key}.path=/path/to/data (a .jsonl, .parquet or .txt file, or a directory of them)")
    if found:
        raise UserError(found)
    return sources, tok_path


def inspect_tokenizer(tok_path: Path, configured: str):
    try:
        return tokenizer.inspect(tok_path)
    except ValueError as exc:
        raise UserError(f"data.tokenizer={configured}: {exc}\n  fix: use a tokenizer.json with an end-of-document "
                        "special token (e.g. <|endoftext|> or </s>), or put a tokenizer_config.json naming its "
                        "eos_token beside it") from None


def processes() -> int:
    """Worker processes per source: TRAINCTL_PREPARE_PROCS, else the usable CPUs capped at MAX_PROCS."""
    value = os.environ.get(PROCS_ENV)
    if value is not None:
        try:
            procs = int(value)
            if procs < 1:
                raise ValueError
        except ValueError:
            raise UserError(f"{PROCS_ENV}={value!r}: not a positive whole number\n  fix: {PROCS_ENV}=8, "
                            "or unset it to use the CPUs available") from None
        return procs
    try:
        cpus = len(os.sched_getaffinity(0))  # what SLURM/cgroups let this process use
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_PROCS))


def output_dir(configured: str) -> tuple[Path, bool]:
    """(the output directory, whether this call created it)."""
    out = Path(configured).expanduser().absolute()
    existed = out.is_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"data.prepared_dir={configured}: cannot create {out}: {exc.strerror}\n"
                        "  fix: data.prepared_dir=/a/writable/directory") from None
    return out, not existed


# ---- the figures ------------------------------------------------------------------------

def mixture_figures(shards: dict[str, dict], weights: dict[str, float], train_tokens: int) -> dict[str, dict]:
    """Per source: documents, tokens, weight share, epochs the run takes of it, and whether that is > MAX_EPOCHS.

    ``shards`` maps a source to its manifest (documents, tokens); epochs = share x
    train_tokens / tokens (None for a source with no tokens, which the run cannot sample).
    """
    total_weight = sum(weights.values())
    figures = {}
    for name, manifest in shards.items():
        share = weights[name] / total_weight
        tokens = manifest["tokens"]
        epochs = share * train_tokens / tokens if tokens else None
        figures[name] = {
            "documents": manifest["documents"],
            "tokens": tokens,
            "weight": weights[name],
            "share": share,
            "epochs": epochs,
            "over_max_epochs": epochs is None or epochs > MAX_EPOCHS,
        }
    return figures


def report(cfg, out_dir: Path, tok_path: Path, train_tokens: int, shards: dict[str, dict],
           status: dict[str, str]) -> dict:
    """The prepare.json content."""
    figures = mixture_figures(shards, {n: s.weight for n, s in cfg.data.sources.items()}, train_tokens)
    for name, fig in figures.items():
        fig.update(status=status[name], prefix=str(out_dir / name), dtype=shards[name]["dtype"],
                   eod_id=shards[name]["eod_id"], source=shards[name]["source"]["path"])
    return {
        "mixture": cfg.data.name,
        "prepared_dir": str(out_dir),
        "tokenizer": str(tok_path),
        "train_tokens": train_tokens,
        "max_epochs": MAX_EPOCHS,
        "total_tokens": sum(f["tokens"] for f in figures.values()),
        "sources": figures,
    }


def prepare_table(numbers: dict):
    from rich.table import Table


    budget = si(numbers["train_tokens"])
    table = Table(title=f"trainctl prepare: {numbers['mixture']}", title_justify="left", caption_justify="left",
                  caption=f"shards in {numbers['prepared_dir']}; the run trains on {budget} tokens; "
                          f"epochs = share x {budget} / the source's tokens")
    for column, justify in (("source", "left"), ("status", "left"), ("documents", "right"), ("tokens", "right"),
                            ("share", "right"), ("epochs", "right"), ("note", "left")):
        table.add_column(column, justify=justify)
    for name, f in numbers["sources"].items():
        epochs = "-" if f["epochs"] is None else f"{f['epochs']:.3g}"
        note = ("[bold red]no tokens[/]" if f["epochs"] is None else
                f"[bold yellow]> {MAX_EPOCHS:g} epochs: repeated data is worth less[/]" if f["over_max_epochs"] else "")
        table.add_row(name, f["status"], f"{f['documents']:,}", f"{f['tokens']:,}", f"{f['share']:.1%}", epochs, note)
    return table


# ---- every source, in this process ------------------------------------------------------------------------

def prepare(cfg, train_tokens: int, say=print) -> dict:
    """Build or skip every source's shard; the report (also written to {prepared_dir}/prepare.json)."""
    sources, tok_path = check_inputs(cfg.data)
    tok = inspect_tokenizer(tok_path, cfg.data.tokenizer)
    tokenizer_sha = sha256(tok_path)
    procs = processes()
    out_dir, created = output_dir(cfg.data.prepared_dir)
    try:
        shards, status = _prepare_all(shard, sources, tok, tokenizer_sha, out_dir, procs, say)
    except BaseException:
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()  # nothing finished: leave no empty directory behind (finished shards stay)
        raise
    numbers = report(cfg, out_dir, tok_path, train_tokens, shards, status)
    numbers["tokenizer_vocab_size"] = tok.vocab_size
    if tok.vocab_size > cfg.model.vocab_size:
        say(f"warning: data.tokenizer has {tok.vocab_size:,} tokens, more than model.vocab_size="
            f"{cfg.model.vocab_size:,}: the model cannot embed the ids above it\n"
            f"  fix: model.vocab_size={tok.vocab_size} (or a multiple of 128 above it)")
    shard.write_json_atomic(out_dir / REPORT, numbers)
    return numbers


def unfinished(shard, sources, tokenizer_sha, out_dir) -> tuple[dict, list]:
    """({name: manifest} of the finished shards, [(source, fingerprint, why)] of the others)."""
    done, todo = {}, []
    for source in sources:
        fp = fingerprint(source)
        manifest = shard.read_manifest(out_dir, source.name)
        why = shard.stale_reason(manifest, out_dir, source.name, fp, tokenizer_sha)
        if why is None:
            done[source.name] = manifest
        else:
            todo.append((source, fp, why))
    return done, todo


def _prepare_all(shard, sources, tok, tokenizer_sha, out_dir, procs, say) -> tuple[dict, dict]:
    """Skip or build each source in turn: ({name: manifest}, {name: "skipped" | "built"})."""
    done, todo = unfinished(shard, sources, tokenizer_sha, out_dir)
    for name, manifest in done.items():
        say(f"{name}: skipped (finished: {manifest['documents']:,} documents, manifest matches "
            "the source and the tokenizer)")
    status = dict.fromkeys(done, "skipped")
    for source, fp, why in todo:
        say(f"{source.name}: building ({why}): {len(source.files)} {source.builder} file(s), up to {procs} "
            f"process(es), EOD {tok.eod_token!r} = {tok.eod_id} ({tok.eod_from}), {tok.dtype_name}")
        done[source.name] = build_one(shard, source, fp, tok, tokenizer_sha, out_dir, procs)
        status[source.name] = "built"
    order = [s.name for s in sources]
    return {n: done[n] for n in order}, {n: status[n] for n in order}


def build_one(shard, source, fp, tok, tokenizer_sha, out_dir, procs) -> dict:
    """shard.build with a progress bar over the documents written (a terminal only), and its errors as UserErrors."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    key = f"data.sources.{source.name}"
    console = Console(stderr=True)
    with Progress(TextColumn(f"writing {source.name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("write", total=None)
        try:
            return shard.build(source, fp, tok, tokenizer_sha, out_dir, procs,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
        except (KeyError, TypeError) as exc:
            message = exc.args[0] if exc.args else str(exc)
            raise UserError(f"{key}.text_key={source.text_key}: {message}\n  fix: {key}.text_key=<the column "
                            "with the document text>") from None
        except ValueError as exc:
            raise UserError(f"{key}.path={source.path}: {exc}\n  fix: check the file(s), or point {key}.path "
                            "at .jsonl, .parquet or .txt data") from None
