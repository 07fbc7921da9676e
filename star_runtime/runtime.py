"""The runtime apps use: a loaded bundle, shared by any number of conversations and threads.

    from star_runtime import Runtime
    rt = Runtime.load()                                       # the default bundle (below)
    rt = Runtime.load("model.onnx", device="cpu")            # a bundle folder from star-export
    conv = rt.conversation(situation="I lost my job.", seed=0)
    r = conv.reply("I can't sleep.", on_token=lambda piece: print(piece, end=""))
    r.text, r.strategy, r.strategy_probs, r.timings, r.escalated

    conv = rt.conversation(situation="I lost my job.", history=saved)   # go on from conv.history()

    for piece in (stream := conv.stream("And I feel alone.")):             # the same, as an iterator
        print(piece, end="")
    stream.reply.strategy

    g = rt.generate(context_ids, max_new_tokens=40, stop_at_eos=False)  # greedy ids in and out (benchmarks)

One `Runtime` holds the graphs and weights once; each conversation holds only its history and,
while it replies, its KV cache. `reply` may run in several threads at once, one conversation
per thread (onnxruntime sessions allow concurrent runs); on `rt.batched(rows)` those threads'
replies are decoded together, one decoder step for all of them (star_runtime.batching).

The default bundle (`Runtime.load()` and star-chat without --model): the folder in
$STAR_BUNDLE, else the one installed with the package, star_runtime/data/default_bundle/.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from star_runtime.bundle import BundleError, TOKENIZER_FILES, load_manifest, read_file
from star_runtime.conversation import Conversation, Reply
from star_runtime.batching import WINDOW_S, StepBatcher
from star_runtime.decoding import Decoder, Generation, generate
from star_runtime.engine import Engine
from star_runtime.safety import SafetyPolicy
from star_runtime.sampling import DecodingOptions
from star_runtime.selfcheck import run_selfcheck
from star_runtime.tokenizer import Tokenizer, TokenizerError


BUNDLE_ENV = "STAR_BUNDLE"
PACKAGED_BUNDLE = ("data", "default_bundle")  # inside the star_runtime package

NO_BUNDLE = (
    "no model to load: pass a bundle folder (star-chat --model BUNDLE), set $STAR_BUNDLE, or build a "
    "bundle with `star-train --stage single --preset compact --out runs/star` then "
    "`star-export --checkpoint runs/star --out bundle` (both need pip install 'star-esc[train]')"
)


def default_bundle() -> Path | None:
    """The bundle to open when none is named: $STAR_BUNDLE, else the packaged one, else None."""
    if env := os.environ.get(BUNDLE_ENV):
        return Path(env).expanduser()
    packaged = Path(str(resources.files("star_runtime").joinpath(*PACKAGED_BUNDLE)))
    return packaged if packaged.is_dir() else None


class Runtime:
    """A loaded STAR bundle: its graphs, weights, tokenizer and safety policy, opened once.

    Make one with `Runtime.load(path)` (or `Runtime.load()` for the default bundle), then talk
    with `rt.conversation(...).reply(text)`, or call `rt.generate(ids)` for token ids in and out.
    Attributes: `path` (the bundle folder), `spec` (the model's sizes, ids, strategies and
    decoding defaults: star_runtime.spec.BundleSpec), `manifest` (the whole manifest.json),
    `device`, `tokenizer`, `safety`. One Runtime may serve many threads, one conversation per thread.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], engine: Engine, tokenizer: Tokenizer,
                 safety: SafetyPolicy) -> None:
        self.path, self.manifest, self.engine, self.tokenizer, self.safety = path, manifest, engine, tokenizer, safety
        self.spec, self.device = engine.spec, engine.device
        self.decoder: Decoder = engine  # what conversations decode with: the engine, or a StepBatcher
        self.verified = False  # the golden self-check passed at load

    def batched(self, rows: int, window: float = WINDOW_S) -> Runtime:
        """This runtime (the same sessions, weights and safety policy) with conversations on up to
        `rows` threads decoded together, one decoder step for all (star_runtime.batching; CPU only).
        A runtime loaded with verify=True runs the golden self-check through the batch too (its
        steps take other kernels: two rows at least), BundleError if it fails."""
        other = copy.copy(self)
        other.decoder = StepBatcher(self.engine, rows, window)
        if self.verified:
            run_selfcheck(self.engine, self.manifest, f"{self.path} (batched)", decoder=other.decoder)
        return other

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, device: str = "cpu", *, threads: int | None = None,
             safety: SafetyPolicy | None = None, verify: bool = True) -> Runtime:
        """Open a bundle folder. BundleError (a ValueError) names what is wrong with it.

        path: the bundle folder; None opens the default bundle (module docstring). An empty
        string is refused rather than read as "none". device: "cpu" or "cuda" (needs
        onnxruntime-gpu). threads: intra-op threads, a positive integer (default: one per
        core). safety: the safety policy (default: the built-in one, SafetyPolicy.load()).
        verify: check the graphs' and weights' sha256 against the manifest, and run the golden
        self-check (star_runtime.selfcheck: the bundle is refused when this onnxruntime, execution
        provider or CPU computes something else than the exporter did). verify=False skips both;
        the manifest's schema, file sizes, containment, the fingerprint and the tokenizer files'
        hashes are always checked.
        """
        if path is None:
            path = default_bundle()
            if path is None:
                raise BundleError(NO_BUNDLE)
        elif not str(path).strip():
            raise BundleError("the bundle path is empty: name a bundle folder, or pass None for the default")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer (or None: one per core), not {threads!r}")
        path = Path(path)
        manifest = load_manifest(path, verify=verify)
        try:
            tokenizer = Tokenizer.from_bytes({name: read_file(path, manifest, name) for name in TOKENIZER_FILES}, path)
        except TokenizerError as err:
            raise BundleError(f"{path}: the bundle's tokenizer files cannot be read: {err}") from None
        if tokenizer.strategy_ids != manifest["strategies"]["token_ids"]:
            raise BundleError(f"{path}: the tokenizer's strategy ids differ from the manifest's")
        if tokenizer.vocab_size != manifest["io"]["vocab_size"]:
            raise BundleError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the manifest "
                              f"{manifest['io']['vocab_size']}")
        engine = Engine.open(path, manifest, device=device, threads=threads)
        if verify:
            run_selfcheck(engine, manifest, str(path))
        rt = cls(path, manifest, engine, tokenizer, safety if safety is not None else SafetyPolicy.load())
        rt.verified = verify
        return rt

    def options(self, **overrides: Any) -> DecodingOptions:
        """The bundle's decoding options (the paper's, as the exporter wrote them), with
        `overrides` (DecodingOptions' fields; None = keep)."""
        return self.spec.decoding.but(**overrides)

    def conversation(self, situation: str | None = None, seed: int | None = None, *,
                     options: DecodingOptions | None = None, history: Sequence[Mapping[str, Any]] = (),
                     **overrides: Any) -> Conversation:
        """A new conversation. seed: the sampling seed (same seed and messages, same replies).

        options: how replies are decoded (default: the bundle's, `rt.options()`); overrides:
        DecodingOptions' fields on top of them (`do_sample=False` for greedy replies,
        `max_new_tokens=...`). history: the messages of an earlier conversation to go on from (a
        saved `Conversation.history()`; star_runtime.conversation, "History"): its user messages
        are checked by the safety layer as they were when they were sent.
        """
        base = options if options is not None else self.options()
        return Conversation(self, situation, seed, base.but(**overrides), history)

    def generate(self, context_ids: Sequence[int] | np.ndarray, options: DecodingOptions | None = None, *,
                 min_new_tokens: int = 0, stop_at_eos: bool = True, seed: int | None = None,
                 forced_strategy: int | None = None, on_token: Callable[[int], bool | None] | None = None,
                 **overrides: Any) -> Generation:
        """Token ids in, strategy and token ids out, with timings (the benchmarks' entry point).

        context_ids: the encoder input, cut to its last max_source_length tokens here.
        options (default: the bundle's, greedy) and overrides: as for `conversation`; sampling draws
        from a generator seeded by `seed`. max_new_tokens: at most max_positions - 1 (511 for
        BlenderBot-Small): decoder position 0 reads __start__, position 1 the strategy token, and
        token t is read at position t + 1. on_token(token_id): False stops (decoding.stops).
        """
        base = options if options is not None else self.options(do_sample=False)
        ids = list(context_ids)[-self.spec.max_source_length:]
        return generate(self.engine, ids, base.but(**overrides), min_new_tokens=min_new_tokens,
                        stop_at_eos=stop_at_eos, rng=np.random.default_rng(seed), forced_strategy=forced_strategy,
                        on_token=on_token)


__all__ = ["Runtime", "Reply", "Conversation", "Generation", "BundleError", "default_bundle"]
