"""BERT's uncased WordPiece tokenizer in the standard library, for the semantic screen's encoder.

The same as transformers' BertTokenizer(do_lower_case=True, tokenize_chinese_chars=True):

    basic:      drop NUL, U+FFFD and control characters; whitespace to spaces; spaces around CJK
                characters; lowercase; NFD and drop combining marks (accents); split off every
                punctuation character
    wordpiece:  each word split greedily into the longest vocabulary entries, "##" marking a
                piece inside a word; a word with no split, or over 100 characters, is [UNK]
    ids:        [CLS] pieces [SEP], cut to max_length

tests/test_safety.py checks it against transformers on ESConv's texts.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from pathlib import Path

MAX_WORD_CHARS = 100


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


def basic_tokens(text: str) -> list[str]:
    """BERT's BasicTokenizer: cleaned, lowercased, accents stripped, punctuation split off."""
    chars = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD:
            continue
        cat = unicodedata.category(ch)
        if ch in "\t\n\r" or cat == "Zs" or ch == " ":
            chars.append(" ")
        elif cat in ("Cc", "Cf"):
            continue
        elif _is_cjk(cp):
            chars.append(f" {ch} ")
        else:
            chars.append(ch)
    out: list[str] = []
    for word in "".join(chars).split():
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        piece = ""
        for ch in word:
            if _is_punctuation(ch):
                if piece:
                    out.append(piece)
                out.append(ch)
                piece = ""
            else:
                piece += ch
        if piece:
            out.append(piece)
    return out


class WordPiece:
    """vocab.txt (one token a line, the line number is the id) -> encode(text) ids."""

    def __init__(self, vocab_file: Path) -> None:
        tokens = vocab_file.read_text(encoding="utf-8").split("\n")
        self.vocab = {t: i for i, t in enumerate(tokens) if t}
        self.cls, self.sep, self.unk, self.pad = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[UNK]", "[PAD]"))
        self._word = lru_cache(maxsize=65536)(self._pieces)

    def _pieces(self, word: str) -> tuple[int, ...]:
        if len(word) > MAX_WORD_CHARS:
            return (self.unk,)
        out, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    out.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return (self.unk,)
            start = end
        return tuple(out)

    def encode(self, text: str, max_length: int = 128) -> list[int]:
        """[CLS] + wordpieces of `text` + [SEP], at most max_length ids."""
        ids = [i for word in basic_tokens(text) for i in self._word(word)]
        return [self.cls, *ids[:max_length - 2], self.sep]
