"""An offline CLIP tokenizer for toy captions: each caption word is one token, anything else
falls back to single characters.

The merges are learned by plain BPE on the caption words (most frequent pair first, ties by
name) until every word is one symbol, so CLIP's rank-ordered merging reproduces whole words.
"""
from __future__ import annotations

import json
import string
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

MAX_LENGTH = 16  # tokens per caption, including start and end
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that turn each word (CLIP-style, last symbol ending in "</w>") into one symbol."""
    seqs = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        counts = Counter(p for s in seqs for p in zip(s, s[1:]))
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        seqs = [_merge(s, best) for s in seqs]
    return merges


def _merge(seq: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return tuple(out)


def write_tokenizer(folder: str | Path, words: list[str]) -> CLIPTokenizer:
    """Write vocab.json, merges.txt and the tokenizer config to `folder`; return the tokenizer."""
    folder = Path(folder)
    merges = learn_merges(words)
    chars = [c for c in string.printable if not c.isspace() and not c.isupper()]
    symbols = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges)]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*symbols, BOS, EOS]))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_LENGTH)
    tokenizer.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)
