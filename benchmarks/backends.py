"""The worker: one backend, loaded and timed in a process of its own (run by harness.run_worker).

    python benchmarks/backends.py < spec.json     ->  one JSON line on stdout

Every backend decodes greedily, with the project's repetition penalty (1.03), exactly n response
tokens for every context (end-of-sequence banned), from the same token ids:

    eager      star_training.generate on the checkpoint (PyTorch): encoder, decoder position 0 ->
               strategy, then n positions, each followed by STAR and the LM head.
    optimum    optimum's ORTModelForSeq2SeqLM on the checkpoint's base model, WITHOUT STAR and
               without a strategy head: it generates n + 1 tokens so that it runs as many decoder
               positions (1 + n) as the others, and its first generated token stands in for the
               strategy (its "time to the strategy" is the time to that token).
    runtime-*  star_runtime on a bundle (float32 or int8; "-nostar": STAR bypassed in the export).
    ctranslate2-*   CTranslate2's Translator on its conversion of the base model
               (ctranslate2_convert.py; float32 or int8 weights), WITHOUT STAR, under optimum's
               contract: n + 1 tokens, the first standing in for the strategy.

Each backend is a loader returning `reply() -> (Trace, responses)`; the timestamps of the trace
come from the backend's own per-position hook (a decoder pre-forward hook, a transformers
streamer, the runtime's token callback, CTranslate2's per-step callback), so that all backends
are timed by the same clock at the same points; the one exception is the runtime's time to the
strategy, which has no callback and is taken from its `Timings`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPETITION_PENALTY, TIMINGS, Trace, WorkerSpec, peak_rss_bytes  # noqa: E402

Reply = Callable[[], tuple[Trace, list[list[int]]]]


def load_eager(spec: WorkerSpec) -> Reply:
    import torch

    from star_training.checkpoint import load_model
    from star_training.generate import generate

    torch.set_num_threads(spec.threads)
    model = load_model(spec.path).eval().to(spec.device)
    ids = torch.tensor(spec.input_ids, device=spec.device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if spec.device == "cuda" else (lambda: None)
    calls: list[float] = []

    def before_decoder(module: object, args: object) -> None:
        sync()  # on CUDA the previous position's token is only known once its kernels are done
        calls.append(time.perf_counter())

    # decode() is called once for __start__ (-> strategy) and once per response position; the
    # k-th call (0-based) starts right after the token of position k - 1 is chosen.
    model.base.model.decoder.register_forward_pre_hook(before_decoder)

    def reply() -> tuple[Trace, list[list[int]]]:
        calls.clear()
        trace = Trace(start=time.perf_counter())
        out = generate(model, ids, mask, do_sample=False, repetition_penalty=REPETITION_PENALTY,
                       max_new_tokens=spec.reply_len, stop_at_eos=False)
        sync()
        trace.end = time.perf_counter()
        trace.strategy, trace.tokens = calls[1], calls[2:] + [trace.end]
        return trace, out.responses

    return reply


def load_optimum(spec: WorkerSpec) -> Reply:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForSeq2SeqLM
    from transformers import GenerationConfig

    torch.set_num_threads(spec.threads)  # the logits processors run in torch
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec.threads
    provider = "CUDAExecutionProvider" if spec.device == "cuda" else "CPUExecutionProvider"
    model = ORTModelForSeq2SeqLM.from_pretrained(spec.path, session_options=options, provider=provider)
    model.generation_config.forced_eos_token_id = None  # would force __end__ as the last token
    ids = torch.tensor(spec.input_ids, device=model.device)
    mask = torch.ones_like(ids)
    n = spec.reply_len + 1  # the strategy's position, then the reply
    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                              repetition_penalty=REPETITION_PENALTY, eos_token_id=spec.special_ids["eos"],
                              pad_token_id=spec.special_ids["pad"],
                              decoder_start_token_id=spec.special_ids["start"])
    puts: list[float] = []

    class Streamer:  # transformers calls put() with the decoder's start ids, then with each new token
        def put(self, value: object) -> None:
            puts.append(time.perf_counter())

        def end(self) -> None:
            pass

    def reply() -> tuple[Trace, list[list[int]]]:
        puts.clear()
        trace = Trace(start=time.perf_counter())
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, streamer=Streamer())
        trace.end = time.perf_counter()
        trace.strategy, trace.tokens = puts[1], puts[2:]
        return trace, out[:, 2:].tolist()  # without __start__ and the strategy's stand-in

    return reply


def load_runtime(spec: WorkerSpec) -> Reply:
    from star_runtime import Runtime

    rt = Runtime.load(spec.path, device=spec.device, threads=spec.threads)
    ids = spec.input_ids[0]  # batch 1: the runtime decodes one conversation per call
    stamps: list[float] = []

    def on_token(token: int) -> None:  # called right after each response token is chosen
        stamps.append(time.perf_counter())

    def reply() -> tuple[Trace, list[list[int]]]:
        stamps.clear()
        trace = Trace(start=time.perf_counter())
        g = rt.generate(ids, do_sample=False, repetition_penalty=REPETITION_PENALTY, max_new_tokens=spec.reply_len,
                        stop_at_eos=False, on_token=on_token)
        trace.end = time.perf_counter()
        # No callback marks the strategy: its time is the runtime's own (perf_counter from the
        # start of its generate, which begins microseconds after trace.start).
        trace.strategy, trace.tokens = trace.start + g.timings.strategy_ms / 1e3, list(stamps)
        return trace, [g.tokens]

    return reply


def load_ctranslate2(spec: WorkerSpec) -> Reply:
    """Like load_optimum: greedy, the penalty, n + 1 tokens with __end__ banned (min = max decoding
    length), the first standing in for the strategy. The timestamps come from translate_batch's
    callback, which CTranslate2 calls from its decoding loop as soon as a step's token is chosen
    (generate_tokens is the same callback behind a queue, for one context only). One difference
    from transformers, irrelevant to the timing: CTranslate2 penalizes the tokens it generated,
    transformers also the decoder start token __start__ (it is in the decoder's input ids)."""
    import ctranslate2

    path = Path(spec.path)
    vocab = json.loads((path / "shared_vocabulary.json").read_text())  # one string per id
    ids = {token: i for i, token in enumerate(vocab)}
    # The weights were quantized at conversion (artifacts.py), which loaded the base-size model in
    # 0.17 s and 211 MB peak RSS against 0.7 s and 481 MB for int8 from a float32 folder.
    compute_type = "int8" if spec.backend.endswith("-int8") else "float32"
    # Only the reply closure holds the translator, so it is freed when measure() returns: one still
    # alive at interpreter exit aborts the process (4.8.5: "terminate called without an active
    # exception", exit 134), which the parent would take for a failed worker.
    translator = ctranslate2.Translator(str(path), device=spec.device, compute_type=compute_type,
                                        intra_threads=spec.threads, inter_threads=1)
    source = [[vocab[i] for i in row] for row in spec.input_ids]
    n = spec.reply_len + 1  # the strategy's position, then the reply
    steps: list[float] = []
    tokens: list[list[int]] = [[] for _ in source]

    def on_step(step: ctranslate2.GenerationStepResult) -> bool:  # once per context and step
        if step.step == len(steps):
            steps.append(time.perf_counter())
        tokens[step.batch_id].append(step.token_id)
        return False  # go on

    def reply() -> tuple[Trace, list[list[int]]]:
        steps.clear()
        for row in tokens:
            row.clear()
        trace = Trace(start=time.perf_counter())
        results = translator.translate_batch(
            source, beam_size=1, repetition_penalty=REPETITION_PENALTY, max_decoding_length=n,
            min_decoding_length=n, max_input_length=0, callback=on_step)
        trace.end = time.perf_counter()
        trace.strategy, trace.tokens = steps[0], steps[1:]
        if [[ids[t] for t in r.hypotheses[0]] for r in results] != tokens:
            raise RuntimeError("CTranslate2's results are not the tokens its callback saw")
        return trace, [row[1:] for row in tokens]  # without the strategy's stand-in

    return reply


def load_backend(spec: WorkerSpec) -> Reply:
    if spec.backend == "eager":
        return load_eager(spec)
    if spec.backend == "optimum":
        return load_optimum(spec)
    if spec.backend.startswith("runtime-"):
        return load_runtime(spec)
    if spec.backend.startswith("ctranslate2-"):
        return load_ctranslate2(spec)
    raise ValueError(f"unknown backend {spec.backend!r}")


def measure(spec: WorkerSpec) -> dict:
    """Load, warm up, time `repeats` replies; check every reply has exactly reply_len tokens."""
    started = time.perf_counter()
    reply = load_backend(spec)
    load_s = time.perf_counter() - started
    for _ in range(spec.warmup):
        reply()
    runs, responses = [], []
    for _ in range(spec.repeats):
        trace, responses = reply()
        lengths = {len(r) for r in responses}
        if lengths != {spec.reply_len} or len(trace.tokens) != spec.reply_len:
            raise RuntimeError(f"replies of {sorted(lengths)} tokens ({len(trace.tokens)} timestamps), "
                               f"expected exactly {spec.reply_len}")
        runs.append(trace.timings())
    return {"backend": spec.backend, "load_s": load_s, "peak_rss_bytes": peak_rss_bytes(),
            "runs": {k: [r[k] for r in runs] for k in TIMINGS}, "tokens": responses}


def main() -> int:
    out, sys.stdout = sys.stdout, sys.stderr  # libraries' prints must not mix with the result line
    try:
        result = measure(WorkerSpec(**json.load(sys.stdin)))
    except Exception as e:  # reported by the parent as one message
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
