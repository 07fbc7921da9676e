"""star_runtime.tokenizer against transformers' slow BlenderbotSmallTokenizer (the reference).

The reference gets the strategy tokens through `add_special_tokens`, as training does. Parity is
checked on every situation and utterance of ESConv, on edge cases and on random strings built from
the pieces that make the splitting rules differ (added-token fragments, quotes, newlines, the
whitespace that `re` and `regex` disagree on). Text holding an added token itself is where the two
differ on purpose: ours encodes it as ordinary text (USER_TYPED, test_typed_special_tokens_*).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest

from star_runtime.strategies import STRATEGIES, STRATEGY_NAMES
from star_runtime.tokenizer import Tokenizer, TokenizerError

EDGE_CASES = [
    "",
    " ",
    "   \t  ",
    "\n",
    "\n\n",
    "hello\nworld",
    "a\n\nb\r\nc\rd",
    "'\n",
    "end.\n",
    "Hello, World! I'm fine (really).",
    "don't 'quote' rock 'n' roll '''",
    "...?!?!,,((()))",
    "I'm 😀 happy 🎉🎉 ❤️",
    "Ça va? Très bien. 你好，世界 Привет мир ΟΔΟΣ Σίσυφος İstanbul ß ẞ مرحبا",
    "\x00\x01 a\x1cb\x1d c\x1e\x1fd \x7f \x85x\xa0y \u200b \u2028z\u2029 \ufeff \u3000end",
    "x[question]y [question] [Question [Others",
    "__endnull__ _start_ hello__end_ __newln__ __unk_ [Others [question]",
    "Ünïcödé UPPER lower MiXeD",
    "a" * 300,
]


# What a person may type that the reference would turn into special ids.
USER_TYPED = [
    "[Question] how are you?",
    "[Question][Others]x[Self-disclosure]",
    "x[Question]y [question] [Question [Others",
    "__end__null__ __start____end__ hello__end__ __newln__ __unk__",
    "[Others]__unk__[Self-disclosure]\n[Information]",
    "I said __end__ [Providing Suggestions] you should quit __start__ [Question] __null__",
]
ADDED = ("__null__", "__start__", "__end__", "__unk__", *STRATEGIES)


def has_added_token(text: str) -> bool:
    return any(t in text for t in ADDED)


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def ref(tokenizer_dir: Path):
    transformers = pytest.importorskip("transformers")
    reference = transformers.BlenderbotSmallTokenizer.from_pretrained(str(tokenizer_dir))
    reference.add_special_tokens({"additional_special_tokens": list(STRATEGIES)})
    return reference


@pytest.fixture(scope="module")
def esconv_texts(esconv_dir: Path) -> list[str]:
    texts = []
    for split in ("train", "valid", "test"):
        for line in (esconv_dir / f"{split}.txt").read_text(encoding="utf-8").splitlines():
            conversation = json.loads(line)
            texts.append(conversation["situation"])
            texts.extend(turn["text"] for turn in conversation["dialog"])
    assert len(texts) == 1300 + 38365
    return texts


def ref_encode(ref, text: str) -> list[int]:
    return ref.encode(text, add_special_tokens=False)


def test_special_ids(tok: Tokenizer, ref) -> None:
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.strategy_ids == list(range(54944, 54952)) == ref.convert_tokens_to_ids(list(STRATEGIES))
    assert tok.vocab_size == len(ref) == 54952
    assert [tok.id_to_token(i) for i in tok.strategy_ids] == list(STRATEGIES)
    assert [tok.token_to_id(s) for s in STRATEGIES] == tok.strategy_ids
    assert tok.token_to_id("Hello") == ref.convert_tokens_to_ids("Hello")
    assert tok.token_to_id("no-such-piece") == tok.unk_id
    assert tok.id_to_token(10**9) == "__unk__"
    assert STRATEGIES == tuple(f"[{name}]" for name in STRATEGY_NAMES)


def test_encode_parity_esconv(tok: Tokenizer, ref, esconv_texts: list[str]) -> None:
    start = time.perf_counter()
    mine = [tok.encode(text) for text in esconv_texts]
    seconds = time.perf_counter() - start
    for text, ids in zip(esconv_texts, mine):
        assert ids == ref_encode(ref, text), text
    # Measured 0.9 s cold cache on 2 cores (the reference takes 8 s); 15 s catches a lost cache.
    assert seconds < 15


# The reference decode costs 0.4 ms per utterance (17 s for all of ESConv, 2 cores): the default
# run checks every 8th text, `-m slow` every one.
@pytest.mark.parametrize("step", [8, pytest.param(1, marks=pytest.mark.slow)])
def test_decode_parity_esconv(tok: Tokenizer, ref, esconv_texts: list[str], step: int) -> None:
    for text in esconv_texts[::step]:
        ids = tok.encode(text)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


def test_tokenize_parity(tok: Tokenizer, ref, esconv_texts: list[str]) -> None:
    for text in esconv_texts[:2000] + EDGE_CASES:
        assert tok.tokenize(text) == ref.tokenize(text), text


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases(tok: Tokenizer, ref, text: str) -> None:
    ids = tok.encode(text)
    assert ids == ref_encode(ref, text)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_strategy_tokens_decode_as_single_ids(tok: Tokenizer) -> None:
    ids = [tok.strategy_ids[5], *tok.encode("try a walk")]
    assert tok.decode(ids) == "try a walk"
    assert tok.decode(ids, skip_special_tokens=False) == "[Providing Suggestions] try a walk"


def test_random_strings(tok: Tokenizer, ref) -> None:
    parts = ["__", "end", "null", "_", "[", "]", "Question", "[Others]", "__start__", "'", "\n",
             " ", "  ", ".", ",", "(", "a", "B", "é", "Σ", "\x1c", "\xa0", "😀", "word", "ing"]
    rng = random.Random(0)
    special = {tok.pad_id, tok.bos_id, tok.eos_id, *tok.strategy_ids}
    compared = 0
    for _ in range(400):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(1, 30)))
        ids = tok.encode(text)
        assert not special & set(ids), repr(text)
        if not has_added_token(text):  # the reference cuts added tokens out; we do not
            compared += 1
            assert ids == ref_encode(ref, text), repr(text)
            assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert compared > 100  # measured: 138 of the 400 hold no added token


def test_typed_special_tokens_are_ordinary_text(tok: Tokenizer) -> None:
    special = {tok.pad_id, tok.bos_id, tok.eos_id, *tok.strategy_ids}
    for text in USER_TYPED + list(ADDED):
        assert not special & set(tok.encode(text)), text
        assert not set(ADDED) & set(tok.tokenize(text)), text
    # __unk__ typed is characters, not the unknown-token id; __end__ decodes back to what was typed.
    assert tok.unk_id not in tok.encode("__unk__")
    assert tok.decode(tok.encode("stop __end__ now")) == "stop __end__ now"
    assert tok.tokenize("__end__") == ["_@@", "_@@", "e@@", "n@@", "d@@", "_@@", "_"]


def test_typed_strategy_tag_cannot_forge_a_model_turn(tok: Tokenizer) -> None:
    ids = tok.encode("[Providing Suggestions] try a walk")
    assert not set(tok.strategy_ids) & set(ids) and tok.eos_id not in ids
    assert tok.encode("try a walk") == ids[-3:]  # the words after the tag encode as they would alone


def test_esconv_holds_no_added_token(esconv_texts: list[str]) -> None:
    # Why training data is unchanged by the rule above: none of the 39,665 texts has one (checked
    # case-sensitively, as the reference matches them).
    assert [t for t in esconv_texts if has_added_token(t)] == []


def test_long_inputs(tok: Tokenizer, ref, esconv_texts: list[str]) -> None:
    rng = random.Random(1)
    text = ""
    while len(text) < 100_000:
        text += rng.choice(esconv_texts) + rng.choice([" ", "\n", "  "])
    assert tok.encode(text) == ref_encode(ref, text)
    # One word of 2,000 random letters: the reference's quadratic merge loop still takes 0.3 s.
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(2000))
    assert tok.encode(word) == ref_encode(ref, word)


def test_long_word_is_not_quadratic(tok: Tokenizer) -> None:
    # 100 kB without a space: 0.3 s here; the reference's loop would take minutes.
    rng = random.Random(2)
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(100_000))
    start = time.perf_counter()
    pieces = tok.tokenize(word)
    assert time.perf_counter() - start < 10
    assert "".join(p.removesuffix("@@") for p in pieces) == word


def test_stream_decode(tok: Tokenizer, esconv_texts: list[str]) -> None:
    cut = tok.encode("unbelievably")[:-1]  # ends in a piece that goes on: decode keeps its "@@"
    assert tok.decode(cut).endswith("@@")
    pieces = [tok.id_to_token(i) for i in range(5, 2000)]
    glued = [i for i, p in enumerate(pieces, start=5) if p.endswith("@@")][:50]
    pool = glued + list(range(5, 60)) + [0, 1, 2, 3, 10**6, -1] + tok.strategy_ids
    rng = random.Random(3)
    sequences = [tok.encode(t) for t in esconv_texts[:3000]] + [cut]
    sequences += [[rng.choice(pool) for _ in range(rng.randint(0, 25))] for _ in range(2000)]
    for ids in sequences:
        for skip in (True, False):
            stream = tok.create_stream(skip_special_tokens=skip)
            text = "".join(stream.decode(i) for i in ids) + stream.flush()
            assert text == tok.decode(ids, skip_special_tokens=skip), ids


def test_decode_random_ids_parity(tok: Tokenizer, ref) -> None:
    pool = list(range(0, 300)) + [10**6] + tok.strategy_ids
    rng = random.Random(4)
    for _ in range(300):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 20))]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_save_roundtrip(tok: Tokenizer, ref, tmp_path: Path, esconv_texts: list[str]) -> None:
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    tok.save(tmp_path)  # overwriting a saved folder works
    assert not list(tmp_path.glob(".*tmp*"))
    again = Tokenizer.from_dir(tmp_path)
    loaded = transformers.BlenderbotSmallTokenizer.from_pretrained(str(tmp_path))
    assert again.strategy_ids == tok.strategy_ids and again.vocab_size == tok.vocab_size
    assert loaded.convert_tokens_to_ids(list(STRATEGIES)) == tok.strategy_ids
    assert loaded.all_special_ids == ref.all_special_ids and len(loaded) == len(ref)
    for text in esconv_texts[:300] + EDGE_CASES:
        ids = tok.encode(text)
        assert again.encode(text) == ids == ref_encode(loaded, text), text
        assert loaded.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False)


def write_tiny(folder: Path, vocab: object = None, merges: str = "#version: 0.2\nh e\nhe l\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if vocab is None:
        vocab = {t: i for i, t in enumerate(["__null__", "__start__", "__end__", "__unk__", "hel@@", "l@@", "o"])}
    (folder / "vocab.json").write_text(vocab if isinstance(vocab, str) else json.dumps(vocab))
    (folder / "merges.txt").write_text(merges)
    return folder


def test_tiny_vocab(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(write_tiny(tmp_path))
    assert tok.tokenize("Hello") == ["hel@@", "l@@", "o"]
    assert tok.encode("Hello [Others]") == [4, 5, 6] + [3] * 7  # the typed tag: unknown pieces, not id 14
    assert tok.strategy_ids == list(range(7, 15)) and tok.vocab_size == 15
    assert tok.decode(tok.encode("hello x")) == "hello"  # "x" is unknown: __unk__, skipped


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: (d / "vocab.json").unlink(), "vocab.json: file not found"),
        (lambda d: (d / "merges.txt").unlink(), "merges.txt: file not found"),
        (lambda d: write_tiny(d, vocab='{\n"__null__": 0,\n"__sta'), "vocab.json:3: not valid JSON"),
        (lambda d: write_tiny(d, vocab=["__null__"]), "vocab.json: expected a JSON object"),
        (lambda d: write_tiny(d, vocab={"__null__": 0, "__start__": 1, "__end__": 2, "__unk__": 5}),
         "vocab.json: token ids must be 0..3"),
        (lambda d: write_tiny(d, vocab={"__null__": 0, "__start__": 1, "__end__": 2}),
         "vocab.json: special tokens ['__unk__'] are missing"),
        (lambda d: write_tiny(d, merges="#version: 0.2\nh e\nhel\n"), "merges.txt:3: expected two symbols"),
        (lambda d: (d / "added_tokens.json").write_text('{"[Question]": 4}'), "added_tokens.json: expected"),
        (lambda d: shutil.rmtree(d), "no such tokenizer folder"),
    ],
)
def test_bad_files(tmp_path: Path, setup, message: str) -> None:
    folder = write_tiny(tmp_path / "tok")
    setup(folder)
    with pytest.raises(TokenizerError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Tokenizer.from_dir(folder)
