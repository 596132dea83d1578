"""Train the small byte-level BPE tokenizer shipped as data/sample/tokenizer.json (run once; output is committed).

4,096 tokens (model=tiny's vocab_size), trained on the two sample sources with
Hugging Face `tokenizers` (pip install tokenizers). Any other local
tokenizer.json works in its place: set data.tokenizer=/path/to/tokenizer.json.
"""

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 4096
SPECIAL = ["<|endoftext|>", "<|pad|>"]


def texts(folder: Path):
    for name in ("prose.jsonl", "code.jsonl"):
        with open(folder / name) as f:
            for line in f:
                yield json.loads(line)["text"]


def main(folder: Path) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts(folder), trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    print("vocab", tokenizer.get_vocab_size())


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent))
