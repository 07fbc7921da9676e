"""BlenderBot-Small's BPE tokenizer plus the 8 strategy tokens, in plain Python.

It reproduces transformers' slow `BlenderbotSmallTokenizer` (the reference: SPEC section 2; the
fast one cannot be built from these files) after
`add_special_tokens({"additional_special_tokens": list(STRATEGIES)})`, id for id and string for
string on text without added tokens (tests/test_tokenizer.py checks every ESConv utterance),
without transformers, torch or the `regex` package, so the edge runtime can use it.

One deliberate difference: `encode` is for text people wrote, so it never yields a special id.
The reference cuts `__end__`, `__start__`, `__null__`, `__unk__` and the strategy tags out of
any text and maps them to their ids, which let a user forge turn separators and model turns in
the conversation's context. Here they are ordinary text: a strategy tag is BPE-split like any
word (its token ids lie past the base vocabulary, where BPE never reaches), and a BPE piece that
is itself a special token (`__end__` merges into one piece) is spelled out one character per
piece. None of ESConv's 39,665 situations and utterances contains any of them (checked by
tests/test_tokenizer.py), so training data encodes exactly as the reference does. The context's
real separators and strategy tokens are ids added by the code that builds it (star_training.data,
star_runtime.conversation), never text. The rules below are derived from
transformers/models/blenderbot_small/tokenization_blenderbot_small.py and
tokenization_utils.py (Apache-2.0, The HuggingFace Inc. team), transformers 4.57.

encode(text):
  1. (the reference only: cut out the added tokens, each mapped to its id; see above)
  2. split the text into chunks `\\S+\\n?`, where whitespace is Unicode White_Space (the `regex`
     package's `\\s`, which unlike `re`'s leaves out U+001C..U+001F);
  3. per chunk: a space before each of `. , ! ? ( )`, spaces around `'`, whitespace runs -> one
     space, `\\n` -> ` __newln__`; split on spaces; lowercase each word and BPE-merge it: the pair
     with the lowest rank in merges.txt merges everywhere in the word, left to right, until no pair
     has a rank; `</w>` marks the last symbol; every piece but the last ends in `@@`;
  4. a piece that is a special token is spelled out: `__end__` -> `_@@ _@@ e@@ n@@ d@@ _@@ _`;
  5. piece -> id through vocab.json (lowercased), `__unk__` (3) when absent.
decode(ids): pieces joined by spaces with `"@@ "` removed; a strategy token is a segment of its
own, segments joined by one space; `skip_special_tokens` drops every added token (`__unk__` too,
and with it any id outside the vocabulary).
"""

from __future__ import annotations

import heapq
import json
import os
import re
from pathlib import Path

from star_runtime.atomic import write_text_atomically
from star_runtime.json_bytes import JSONBytesError, decode_json
from star_runtime.strategies import STRATEGIES

PAD, BOS, EOS, UNK = "__null__", "__start__", "__end__", "__unk__"

# Unicode White_Space: what `\s` matches in the `regex` package the reference tokenizer uses.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_CHUNK = re.compile(f"[^{_WS}]+\n?")
_WS_RUN = re.compile(f"[{_WS}]{{2,}}")
_PUNCT = re.compile(r"([.,!?()])")
_CACHE_LIMIT = 200_000  # chunks; all of ESConv has 27,305 distinct ones


class TokenizerError(ValueError):
    """The tokenizer files are missing or not what BlenderBot-Small writes."""


def _parse_json(data: bytes, path: Path) -> object:
    try:
        return decode_json(data, str(path))
    except JSONBytesError as err:
        raise TokenizerError(str(err)) from None


class Tokenizer:
    """BlenderBot-Small BPE with the strategy tokens appended after the base vocabulary.

    Attributes: `pad_id`, `bos_id`, `eos_id`, `unk_id`; `strategy_ids[k]` is the id of
    `STRATEGIES[k]`; `vocab_size` counts every id, strategy tokens included (54,952 on the real
    files: the size of the model's embedding).
    """

    def __init__(self, encoder: dict[str, int], merges: list[str]) -> None:
        """encoder: vocab.json's token -> id; merges: merges.txt's pairs in rank order, each "a b"."""
        self._encoder = encoder
        # A pair listed twice keeps its later rank, as in the reference (dict(zip(merges, range))).
        # Keyed by the line's "a b" string, not an (a, b) tuple: the 50k tuples and their strings
        # held 7 MB more.
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._merges = merges
        base = len(encoder)
        self.strategy_ids = list(range(base, base + len(STRATEGIES)))
        self.vocab_size = base + len(STRATEGIES)
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (encoder[t] for t in (PAD, BOS, EOS, UNK))
        self._added = {t: encoder[t] for t in (PAD, BOS, EOS, UNK)} | dict(zip(STRATEGIES, self.strategy_ids))
        self._decoder = [UNK] * self.vocab_size  # id -> token (a list: ids are 0..V-1; a dict held 2.5 MB)
        for t, i in (encoder | self._added).items():
            self._decoder[i] = t
        self._strategy_tokens = frozenset(STRATEGIES)
        self._reserved = frozenset((PAD, BOS, EOS, UNK))  # BPE pieces that would be special ids
        self._cache: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}

    # ---------------------------------------------------------------- files
    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Read vocab.json and merges.txt (and added_tokens.json, when `save` wrote one)."""
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"{folder}: no such tokenizer folder (expected vocab.json and merges.txt)")
        texts = {}
        for name in ("vocab.json", "merges.txt", "added_tokens.json"):
            try:
                texts[name] = (folder / name).read_bytes()
            except FileNotFoundError:
                if name != "added_tokens.json":
                    raise TokenizerError(f"{folder / name}: file not found") from None
            except OSError as err:
                raise TokenizerError(f"{folder / name}: cannot read: {err}") from None
        return cls.from_bytes(texts, folder)

    @classmethod
    def from_bytes(cls, files: dict[str, bytes], folder: str | os.PathLike[str] = ".") -> Tokenizer:
        """The tokenizer from the contents of vocab.json, merges.txt and (optional) added_tokens.json;
        `folder` only names them in errors (star_runtime.bundle reads and hashes a bundle's files)."""
        folder = Path(folder)
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        encoder = _parse_json(files["vocab.json"], vocab_file)
        if not isinstance(encoder, dict) or not all(
            isinstance(t, str) and type(i) is int for t, i in encoder.items()
        ):
            raise TokenizerError(f"{vocab_file}: expected a JSON object mapping token strings to integer ids")
        if sorted(encoder.values()) != list(range(len(encoder))):
            raise TokenizerError(f"{vocab_file}: token ids must be 0..{len(encoder) - 1}, each once")
        missing = [t for t in (PAD, BOS, EOS, UNK) if t not in encoder]
        if missing:
            raise TokenizerError(f"{vocab_file}: special tokens {missing} are missing")
        if any(t in encoder for t in STRATEGIES):
            raise TokenizerError(f"{vocab_file}: already holds strategy tokens; they belong in added_tokens.json")
        try:
            lines = files["merges.txt"].decode("utf-8").split("\n")
        except UnicodeDecodeError as err:
            raise TokenizerError(f"{merges_file}: cannot read: {err}") from None
        # The reference drops the first line ("#version: 0.2") and the last one (empty after the
        # final newline), whatever they hold.
        merges = []
        for lineno, line in enumerate(lines[1:-1], start=2):
            pair = line.split()
            if len(pair) != 2:
                raise TokenizerError(f"{merges_file}:{lineno}: expected two symbols, got {line!r}")
            merges.append(line if pair[0] + " " + pair[1] == line else " ".join(pair))
        tokenizer = cls(encoder, merges)
        if "added_tokens.json" in files:
            added_file = folder / "added_tokens.json"
            expected = dict(zip(STRATEGIES, tokenizer.strategy_ids))
            if _parse_json(files["added_tokens.json"], added_file) != expected:
                raise TokenizerError(f"{added_file}: expected exactly the strategy tokens {expected}")
        return tokenizer

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the files this class and transformers' `BlenderbotSmallTokenizer` both load.

        vocab.json and merges.txt in the layout `save_vocabulary` writes; the strategy tokens go to
        added_tokens.json, special_tokens_map.json and tokenizer_config.json, as `save_pretrained`
        writes them after `add_special_tokens`.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)

        def dump(obj: object, sort_keys: bool = False) -> str:
            return json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"

        specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
        flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
        config = {
            "added_tokens_decoder": {
                str(i): {"content": t, **flags, "special": True}
                for t, i in sorted(self._added.items(), key=lambda kv: kv[1])
            },
            "additional_special_tokens": list(STRATEGIES),
            "clean_up_tokenization_spaces": False,
            "tokenizer_class": "BlenderbotSmallTokenizer",
            **specials,
        }
        files = {
            "vocab.json": dump(self._encoder, sort_keys=True),
            "merges.txt": "#version: 0.2\n" + "".join(f"{pair}\n" for pair in self._merges),
            "added_tokens.json": dump(dict(zip(STRATEGIES, self.strategy_ids))),
            "special_tokens_map.json": dump(
                {"additional_special_tokens": [{"content": t, **flags} for t in STRATEGIES], **specials}
            ),
            "tokenizer_config.json": dump(config),
        }
        for name, text in files.items():
            write_text_atomically(folder / name, text)

    # ---------------------------------------------------------------- encode
    def _bpe(self, word: str) -> list[str]:
        """BPE pieces of one lowercased word, `@@` on all but the last.

        The reference re-scans the word after every merge (quadratic: a 10 kB word without
        spaces takes minutes); this keeps the candidate pairs in a heap keyed by (rank, position)
        and pops one rank at a time in position order, which merges the same pairs in the same
        order: a merge makes only longer symbols, so it never recreates the pair being merged.
        """
        if len(word) == 1:
            return [word]  # the reference returns a one-character word without `</w>`
        sym: list[str | None] = list(word)
        sym[-1] += "</w>"
        n = len(sym)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))  # linked list; n / -1 = none
        ranks = self._ranks
        heap = [(r, i) for i in range(n - 1) if (r := ranks.get(f"{sym[i]} {sym[i + 1]}")) is not None]
        heapq.heapify(heap)
        while heap:
            rank, merged = heap[0][0], []
            while heap and heap[0][0] == rank:
                i = heapq.heappop(heap)[1]
                j = nxt[i]
                if sym[i] is None or j == n or ranks.get(f"{sym[i]} {sym[j]}") != rank:
                    continue  # stale: one side was merged since this pair was pushed
                sym[i] += sym[j]
                sym[j] = None
                nxt[i] = nxt[j]
                if nxt[j] != n:
                    prv[nxt[j]] = i
                merged.append(i)
            for i in merged:
                for a, b in ((prv[i], i), (i, nxt[i])):
                    if a >= 0 and b < n and (r := ranks.get(f"{sym[a]} {sym[b]}")) is not None:
                        heapq.heappush(heap, (r, a))
        pieces = [s for s in sym if s is not None]
        return [p + "@@" for p in pieces[:-1]] + [pieces[-1][:-4]]

    def _chunk(self, chunk: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Pieces and ids of one whitespace-free chunk (maybe ending in a newline), cached."""
        hit = self._cache.get(chunk)
        if hit is not None:
            return hit
        text = _PUNCT.sub(r" \1", chunk).replace("'", " ' ")
        text = _WS_RUN.sub(" ", text)  # before the newline swap, as in the reference
        text = text.replace("\n", " __newln__")
        pieces = tuple(p for word in text.split(" ") if word for p in self._bpe(word.lower()))
        pieces = tuple(q for p in pieces for q in (_spelled(p) if p in self._reserved else (p,)))
        ids = tuple(self._encoder.get(p.lower(), self.unk_id) for p in pieces)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[chunk] = (pieces, ids)
        return pieces, ids

    def _pieces(self, text: str) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
        return [self._chunk(c) for c in _CHUNK.findall(text)]

    def tokenize(self, text: str) -> list[str]:
        """Token strings: BPE pieces (`@@` when the word goes on), never an added token."""
        return [p for pieces, _ in self._pieces(text) for p in pieces]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as ordinary text: never a special or strategy id, whatever it holds
        (`__end__` or `[Question]` typed by a person are words); no `__start__`/`__end__` added."""
        return [i for _, ids in self._pieces(text) for i in ids]

    def token_to_id(self, token: str) -> int:
        if token in self._added:
            return self._added[token]
        return self._encoder.get(token.lower(), self.unk_id)

    def id_to_token(self, token_id: int) -> str:
        i = int(token_id)
        return self._decoder[i] if 0 <= i < self.vocab_size else UNK

    # ---------------------------------------------------------------- decode
    def _skipped(self, token: str, skip_special_tokens: bool) -> bool:
        return skip_special_tokens and token in self._added

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; with `skip_special_tokens` the added tokens and `__unk__` are dropped."""
        segments: list[str] = []
        current: list[str] = []
        for token_id in ids:
            token = self.id_to_token(token_id)
            if self._skipped(token, skip_special_tokens):
                continue
            if token in self._strategy_tokens:
                if current:
                    text = " ".join(current).replace("@@ ", "").strip()
                    if text:
                        segments.append(text)
                    current = []
                segments.append(token)
            else:
                current.append(token)
        if current:
            segments.append(" ".join(current).replace("@@ ", "").strip())
        return " ".join(segments)

    def create_stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """An incremental decoder for text printed while tokens are generated."""
        return StreamDecoder(self, skip_special_tokens)


def _spelled(piece: str) -> tuple[str, ...]:
    """A BPE piece one character per piece, `@@` on all but the last (which keeps the piece's)."""
    glue = "@@" if piece.endswith("@@") else ""
    chars = piece.removesuffix("@@")
    return tuple(c + "@@" for c in chars[:-1]) + (chars[-1] + glue,)


class StreamDecoder:
    """Turns ids fed one at a time into text pieces that concatenate to `Tokenizer.decode`.

    A piece ending in `@@` continues its word: its stem is printed at once and the next piece is
    glued to it. Only `decode` of the whole sequence knows that a trailing `@@` piece was the last
    one (decode keeps the `@@` then), so `flush()` returns that `@@` at the end of the stream.

        stream = tokenizer.create_stream()
        for token_id in generated:
            print(stream.decode(token_id), end="")
        print(stream.flush())
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._started = False  # something printed: the next word needs a space before it
        self._glue = False  # the last piece ended in `@@`

    def decode(self, token_id: int) -> str:
        tokenizer = self._tokenizer
        token = tokenizer.id_to_token(token_id)
        if tokenizer._skipped(token, self._skip):
            return ""
        space = " " if self._started else ""
        self._started = True
        if token in tokenizer._strategy_tokens:
            text = ("@@" if self._glue else "") + space + token
            self._glue = False
            return text
        glue = token.endswith("@@")
        stem = token[:-2] if glue else token
        text = stem if self._glue else space + stem
        self._glue = glue
        return text

    def flush(self) -> str:
        """What is left to print once the sequence has ended: `@@` after a cut-off word."""
        text = "@@" if self._glue else ""
        self._glue = False
        return text
