"""The replies as written English (star_runtime.detok): rules, ESConv's references, streaming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from star_runtime.detok import readable
from star_runtime.safety import SafetyPolicy
from star_runtime.safety.stream import ScreenedStream
from star_runtime.tokenizer import Tokenizer

# Measured: 16,437 of ESConv's 18,376 supporter turns (0.894) come back as written, up to case and
# whitespace. The rest, by the first difference: spacing the writer chose around punctuation
# ("Hi..how" -> "Hi. How", 701), colons and digits the tokenizer drops (": )" -> ":)", 434),
# hyphens it drops ("e-mails" -> "emails", 324), quotes and brackets (259), words outside the
# vocabulary (221).
MIN_SHARE = 0.89


@pytest.mark.parametrize(("text", "written"), [
    ("i ' m sorry to hear that . what ' s going on ?", "I'm sorry to hear that. What's going on?"),
    ("you ' re not alone , i promise !", "You're not alone, I promise!"),
    ("wow . . . that is hard", "Wow... that is hard"),
    ('she said " it is fine " and left', 'She said "it is fine" and left'),
    ("i ' ve been there ( a long time ago ) too", "I've been there (a long time ago) too"),
    ("my friend ' s dog is ill", "My friend's dog is ill"),
    ("is it 50 % of your pay ?", "Is it 50% of your pay?"),
    ("", ""),
])
def test_rules(text: str, written: str) -> None:
    assert readable(text) == written


def _references(esconv_dir: Path) -> list[str]:
    return [turn["text"] for split in ("train", "valid", "test")
            for line in (esconv_dir / f"{split}.txt").read_text(encoding="utf-8").splitlines()
            for turn in json.loads(line)["dialog"] if turn["speaker"] == "sys"]


def test_esconv_references_come_back_as_written(esconv_dir: Path, tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_dir(tokenizer_dir)
    refs = _references(esconv_dir)
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    same = sum(norm(readable(tok.decode(tok.encode(r)))) == norm(r) for r in refs)
    print(f"\n{same} of {len(refs)} references come back as written ({same / len(refs):.3f})")
    assert len(refs) == 18_376 and same / len(refs) >= MIN_SHARE


def test_streamed_text_is_the_reply_as_shown(esconv_dir: Path, tokenizer_dir: Path) -> None:
    """Every 7th reference, fed token by token through the screened stream: the pieces passed on
    join to the same text as the whole reply rendered, and no piece is ever taken back."""
    tok, policy = Tokenizer.from_dir(tokenizer_dir), SafetyPolicy.load()
    checked = 0
    for ref in _references(esconv_dir)[::7]:
        ids = tok.encode(ref)
        pieces: list[str] = []
        screen, stream = ScreenedStream(policy, pieces.append, render=readable), tok.create_stream()
        for token in ids:
            if (piece := stream.decode(token)) and not screen.feed(piece):
                break
        verdict = screen.finish(tok.decode(ids).removesuffix("@@"))
        if verdict.escalate:
            continue
        assert "".join(pieces) == readable(tok.decode(ids)), ref
        checked += 1
    assert checked > 2_500
