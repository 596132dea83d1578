"""The training data: the prepared shards, blended by weight through megatron-core's dataset builders.

Post-training stages (``launch.backends.common.reads_raw_chat``: SFT) read chat JSONL
instead, through ``launch.train.chat``, into samples of the same shape; DPO reads preference
pairs through ``launch.train.preference`` (a sample: the chosen and the rejected sequence stacked).

``trainctl prepare`` writes ``{data.prepared_dir}/{source}.bin/.idx`` per mixture
source (megatron-core ``IndexedDatasetBuilder``, one document per sequence, EOD
appended). Here ``BlendedMegatronDatasetBuilder`` + ``GPTDataset`` turn them into
fixed-length samples of ``model.seq_length + 1`` tokens, drawn from the sources
in proportion to their weights (the blended index is exact: 0.7/0.3 gives 700/300
of the first 1,000 samples), each source split train/valid/test by ``data.split``.

The index helpers are megatron-core's C++ ``helpers_cpp``, which the PyPI wheel
ships compiled (``megatron/core/datasets/helpers_cpp.*.so``): nothing compiles.
The built indices are cached under ``RUN_DIR/data_cache`` (rank 0 builds, the
others load after a barrier; RUN_DIR is on the shared file system on SLURM).

Sample order is a pure function of the sample index: a global batch of step s is
samples ``[s * B, (s + 1) * B)`` (B = global batch), split over data-parallel ranks
and micro-batches as Megatron's ``MegatronPretrainingSampler`` does. Resuming needs
only the number of consumed samples.
"""

from __future__ import annotations

from pathlib import Path

from launch.backends.common import reads_raw_chat
from launch.config.schema import StageKind
from launch.data.pairs import sources_problem
from launch.train import preference
from launch.train.chat import build_chat_datasets, check_sources
from launch.train.data_common import PREPARE_HINT, Datasets, MissingData, MissingShards, eod_id

__all__ = ["PREPARE_HINT", "Datasets", "MissingData", "MissingShards", "build_datasets", "check_data", "eod_id",
           "micro_batch", "shard_prefixes", "write_shards"]

def check_data(cfg) -> None:
    """Raise MissingData naming what this run would read and cannot find: shards, chat files for SFT, pairs for DPO."""
    if cfg.stage.kind == StageKind.dpo:
        problem = sources_problem(cfg)
        if problem:
            raise MissingData(problem)
    elif reads_raw_chat(cfg):
        check_sources(cfg)
    else:
        shard_prefixes(cfg)


def shard_prefixes(cfg) -> tuple[list[str], list[float]]:
    """(path prefixes, weights) of the mixture, in config order; raises MissingShards naming what is absent."""
    root = Path(cfg.data.prepared_dir).expanduser().absolute()
    prefixes, weights, missing = [], [], []
    for name, source in cfg.data.sources.items():
        prefix = root / name
        for suffix in (".bin", ".idx"):
            if not prefix.with_suffix(suffix).is_file():
                missing.append(str(prefix.with_suffix(suffix)))
        prefixes.append(str(prefix))
        weights.append(float(source.weight))
    if missing:
        raise MissingShards(f"the prepared data is missing ({', '.join(missing)}): {PREPARE_HINT}")
    return prefixes, weights


def _megatron_tokenizer(vocab_size: int, eod: int):
    """The tokenizer object GPTDatasetConfig needs: its vocabulary size and EOD (no text is tokenized here)."""
    from megatron.core.tokenizers import MegatronTokenizerBase

    class _Prepared(MegatronTokenizerBase):
        def __init__(self):
            super().__init__("", {})
            self._vocab_size, self._eod = vocab_size, eod
            # Part of the dataset's cache key (megatron hashes its config's attributes).
            self.unique_identifiers = {"class": "trainctl.prepared", "vocab_size": vocab_size, "eod": eod}

        @property
        def vocab_size(self):
            return self._vocab_size

        @property
        def eod(self):
            return self._eod

        def tokenize(self, text):  # pragma: no cover - the shards are already tokenized
            raise NotImplementedError

        def detokenize(self, ids):  # pragma: no cover
            raise NotImplementedError

        def vocab(self):  # pragma: no cover
            raise NotImplementedError

        def apply_chat_template(self, *a, **k):  # pragma: no cover
            raise NotImplementedError

    return _Prepared()


def build_datasets(cfg, *, train_samples: int, valid_samples: int, cache_dir: Path) -> Datasets:
    """The blended train and validation datasets (call on every rank; torch.distributed may be initialised)."""
    import torch

    if cfg.stage.kind == StageKind.dpo:
        return preference.build_preference_datasets(cfg, train_samples=train_samples, valid_samples=valid_samples,
                                                    cache_dir=cache_dir)
    if reads_raw_chat(cfg):
        return build_chat_datasets(cfg, train_samples=train_samples, valid_samples=valid_samples,
                                   cache_dir=cache_dir)
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights = shard_prefixes(cfg)
    vocab_size, eod = eod_id(cfg.data.tokenizer)
    split = ",".join(str(float(x)) for x in cfg.data.split)
    config = GPTDatasetConfig(
        random_seed=int(cfg.train.seed),
        sequence_length=int(cfg.model.seq_length),
        blend=(prefixes, weights),
        split=split,
        path_to_cache=str(cache_dir),
        tokenizer=_megatron_tokenizer(vocab_size, eod),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the model's own causal mask
    )
    has_valid = float(cfg.data.split[1]) > 0 and valid_samples > 0
    sizes = [train_samples, valid_samples if has_valid else 0, 0]
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return Datasets(train=train, valid=valid if has_valid else None)


def micro_batch(dataset, *, first_sample: int, micro: int, micro_batch_size: int, dp_rank: int, dp: int):
    """(tokens, labels, loss_mask) of one micro-batch of this rank, as [micro_batch_size, seq] tensors.

    ``first_sample`` is the first sample of the global batch; micro-batch ``micro``
    of it covers ``micro_batch_size * dp`` samples, of which this rank takes its slice.
    """
    import torch

    start = first_sample + micro * micro_batch_size * dp + dp_rank * micro_batch_size
    items = [dataset[(start + i) % len(dataset)] for i in range(micro_batch_size)]
    return tuple(torch.stack([it[key] for it in items]) for key in ("tokens", "labels", "loss_mask"))


def write_shards(sources: dict[str, tuple[str, str]], tokenizer_path: str, out_dir: Path) -> None:
    """Tokenize ``{name: (jsonl path, text key)}`` into ``out_dir/{name}.bin/.idx``, one document per sequence + EOD.

    The layout `trainctl prepare` writes, for tests and benchmarks that must not
    depend on it; real runs use `trainctl prepare`.
    """
    import json

    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tokenizers import Tokenizer

    vocab_size, eod = eod_id(tokenizer_path)
    tok = Tokenizer.from_file(str(tokenizer_path))
    dtype = np.uint16 if vocab_size < 65500 else np.int32
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (path, key) in sources.items():
        builder = IndexedDatasetBuilder(str(out_dir / f"{name}.bin"), dtype=dtype)
        with open(path) as f:
            texts = [json.loads(line)[key] for line in f if line.strip()]
        for enc in tok.encode_batch(texts):
            ids = enc.ids + [eod]
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
        builder.finalize(str(out_dir / f"{name}.idx"))
