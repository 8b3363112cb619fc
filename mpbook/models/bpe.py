"""A byte-level BPE tokenizer trained here, for the ``llama-135m`` preset: the shape of a real
small model's tokenizer (a 49,152-token vocabulary, as SmolLM's) without downloading one.

Byte-level, so any text encodes and every id decodes; trained with Hugging Face ``tokenizers``
on text every machine has, the Python standard library's own source (sorted, so the same
Python gives the same vocabulary), in about half a minute once; the preset's folder keeps it.
The special tokens and the chat template are the word tokenizer's (:mod:`.tokenizer`), at the
same ids, so the presets share ``TOKENIZER_IDS``' pad, bos and eos and their generation config.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

from .tokenizer import BOS, CHAT_TEMPLATE, EOS, IM_END, IM_START, PAD, SPECIALS, UNK

VOCAB_SIZE = 49_152
CORPUS_CHARS = 12_000_000  # enough distinct text for every merge of a 49,152-token vocabulary


def corpus(limit: int = CORPUS_CHARS) -> Iterator[str]:
    """The standard library's Python files in sorted order, up to ``limit`` characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        yield text
        seen += len(text)
        if seen >= limit:
            return


def bpe_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A transformers fast tokenizer: byte-level BPE of ``vocab_size`` tokens, left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        extra_special_tokens=[IM_START, IM_END], padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
