"""The semantic screen: a message compared, by meaning, with statements a clinician has labelled.

The phrase rules catch the words they list; people in crisis use others. This screen embeds each
sentence of a message with a small sentence encoder (all-MiniLM-L6-v2, int8 ONNX, 23 MB; built
by star_export.safety_encoder) and compares it with the prototype statements of
star_runtime/data/safety/prototypes.jsonl: crisis statements per category, and harmless ones
that share their words ("I could kill for a coffee"), joined by 8,000 sentences of everyday chat
(encoder/everyday.npz, embeddings only) so that small talk ("bye", "I'm ready to go") has a
harmless neighbour closer than any crisis statement. Everyday sentences only veto a unit they
are closer to than its crisis statement (no margin): with the prototypes' margin of 0.10 they
also silenced "I don't want to be around anymore, I'm just so tired" (0.665 to a crisis
statement, 0.578 to small talk).

    units     the message's sentences (and the message itself when it is short), at most MAX_UNITS
    e_u       encoder(unit), L2-normalised                                   [U, 384]
    s_uc      max over the crisis prototypes p of category c of  e_u . e_p    cosine similarity
    n_u       max over the harmless prototypes of  e_u . e_p
    f_u       max over the everyday sentences of  e_u . e_f
    flag u    if  max_c s_uc >= MIN_SIMILARITY  and  max_c s_uc - n_u >= MARGIN  and  max_c s_uc > f_u
    verdict   the flagged unit with the highest s_uc; category argmax_c, signal "semantic"

MIN_SIMILARITY and MARGIN are stored beside the embeddings by the build (their choice is
explained in star_export/safety_encoder.py and docs/safety.md). The screen runs on what people write (messages, the situation), after the rules;
not on model replies, where an empathetic reply ("it sounds like you want to end your life")
is close in meaning to the crisis it answers.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from star_runtime.safety.wordpiece import WordPiece

MAX_UNITS = 48  # sentences embedded per message: a 100 kB message costs a bounded time
MAX_TOKENS = 64  # per sentence; longer ones are cut into overlapping windows of words
WINDOW_WORDS, WINDOW_STRIDE = 32, 16
_SENTENCES = re.compile(r"[^.!?\n]+[.!?]*")


def encoder_dir() -> Path:
    return Path(str(resources.files("star_runtime") / "data" / "safety" / "encoder"))


def read_prototypes(path: Path) -> list[dict]:
    """The prototype statements: JSON lines {"text", "category"} (category null: harmless)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for k, row in enumerate(rows):
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError(f"{path}: line {k + 1}: no text")
    return rows


class Encoder:
    """Text -> L2-normalised sentence embeddings [n, 384] with the int8 ONNX encoder."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / "encoder.onnx"), options, providers=["CPUExecutionProvider"])
        self.tokenizer = WordPiece(folder / "vocab.txt")

    def embed(self, texts: list[str], batch: int = 32) -> np.ndarray:
        out = []
        for k in range(0, len(texts), batch):
            ids = [self.tokenizer.encode(t, MAX_TOKENS) for t in texts[k:k + batch]]
            width = max(map(len, ids))
            arr = np.zeros((len(ids), width), np.int64)
            mask = np.zeros_like(arr)
            for i, row in enumerate(ids):
                arr[i, :len(row)], mask[i, :len(row)] = row, 1
            out.append(self.session.run(None, {"ids": arr, "mask": mask})[0])
        return np.concatenate(out) if out else np.zeros((0, 384), np.float32)


def units(text: str) -> list[str]:
    """The pieces of a message that are embedded: sentences, long ones as word windows."""
    pieces = []
    for sentence in _SENTENCES.findall(text):
        words = sentence.split()
        if not words:
            continue
        if len(words) <= WINDOW_WORDS:
            pieces.append(" ".join(words))
        else:
            pieces.extend(" ".join(words[i:i + WINDOW_WORDS]) for i in range(0, len(words) - WINDOW_STRIDE, WINDOW_STRIDE))
    if len(pieces) > 1 and len(text.split()) <= WINDOW_WORDS:
        pieces.append(" ".join(text.split()))
    if len(pieces) > MAX_UNITS:  # the start and, most of all, the end, where a message lands
        pieces = pieces[:MAX_UNITS // 4] + pieces[-(MAX_UNITS - MAX_UNITS // 4):]
    return pieces


@dataclass(frozen=True)
class Match:
    category: str
    similarity: float
    margin: float
    unit: str
    prototype: str
    line: int  # of prototypes.jsonl


class SemanticScreen:
    """The screen of the module docstring, loaded from the encoder folder and prototypes file."""

    def __init__(self, folder: Path | None = None, prototypes: Path | None = None) -> None:
        folder = folder or encoder_dir()
        prototypes = prototypes or folder.parent / "prototypes.jsonl"
        self.rows = read_prototypes(prototypes)
        stored = np.load(folder / "prototypes.npz")
        if str(stored["sha256"]) != hashlib.sha256(prototypes.read_bytes()).hexdigest():
            raise ValueError(f"{folder}/prototypes.npz was built from another {prototypes.name}: rebuild it with "
                             "`python -m star_export.safety_encoder`")
        self.embeddings = stored["embeddings"]
        self.min_similarity, self.margin = float(stored["min_similarity"]), float(stored["margin"])
        everyday = folder / "everyday.npz"  # a deployment's own encoder folder may lack it
        self.everyday = (np.load(everyday)["embeddings"].astype(np.float32) if everyday.is_file()
                         else np.zeros((0, self.embeddings.shape[1]), np.float32))
        self.encoder = Encoder(folder)
        self.categories = [r.get("category") for r in self.rows]
        self._crisis = np.array([c is not None for c in self.categories])

    def scores(self, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For similarities [U, N] of units to prototypes: per unit, the best crisis prototype's
        index and similarity, and that similarity's margin over the best harmless prototype."""
        crisis = np.where(self._crisis[None, :], sims, -np.inf)
        best = crisis.argmax(1)
        s = crisis[np.arange(len(sims)), best]
        harmless = np.where(self._crisis[None, :], -np.inf, sims).max(1)
        return best, s, s - harmless

    def check(self, text: str) -> Match | None:
        pieces = units(text)
        if not pieces:
            return None
        emb = self.encoder.embed(pieces)
        best, s, margin = self.scores(emb @ self.embeddings.T)
        ok = (s >= self.min_similarity) & (margin >= self.margin)
        if len(self.everyday):
            ok &= s > (emb @ self.everyday.T).max(1)
        if not ok.any():
            return None
        u = int(np.where(ok, s, -np.inf).argmax())
        i = int(best[u])
        return Match(self.categories[i], float(s[u]), float(margin[u]), pieces[u], self.rows[i]["text"], i + 1)
