"""The tokens a trimmed LM head keeps: every token the model was trained to produce.

    ids, counts = training_target_ids(tokenizer, esconv_dir, ["chitchat", "esconv-train"])

The output vocabulary is every token the tokenizer knows (54,952), but training only ever asks
the model to produce the tokens of its targets: ESConv's train split's supporter responses
(stage 1 and 2) and, for a model pretrained with stage 0, every utterance of its corpora. Those
ids, with __end__ (which ends every target), are the kept set K; the head's other rows are never
a training target, their logits only ever pushed down. On the shipped default, K is 18,677 of
54,952 ids, and restricting the head to K changed 0 of 300 test replies, greedy and sampled
(benchmarks/lm_head.py, docs/performance.md). Valid and test splits are never read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from star_runtime.tokenizer import Tokenizer
from star_training.corpus import build_lm_examples, read_corpus
from star_training.data import build_examples, load_conversations


def training_target_ids(tokenizer: Tokenizer, data: str | Path, corpora: Sequence[str] = ()) -> tuple[np.ndarray, dict[str, int]]:
    """The sorted ids of every training target (module docstring), and the distinct ids per source.

    data: the ESConv folder (its train split); corpora: stage 0's corpus names (star-train's
    --corpus), read as star-train reads them.
    """
    sources = {"esconv-train (stage 1 responses)":
               [e.labels for e in build_examples(load_conversations(Path(data), "train"), tokenizer)]}
    for corpus in corpora:
        sources[f"{corpus} (stage 0)"] = [e.labels[1:] for e in build_lm_examples(read_corpus(corpus, Path(data)), tokenizer)]
    counts, kept = {}, {tokenizer.eos_id}
    for name, labels in sources.items():
        ids = {i for row in labels for i in row if i >= 0}
        counts[name] = len(ids)
        kept |= ids
    return np.array(sorted(kept), np.int64), counts
