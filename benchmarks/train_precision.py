"""bf16 autocast against float32 for training on this machine, on the same batches, and the
padding share of random and length-bucketed batches.

    python benchmarks/train_precision.py --preset compact --steps 40 --batch-size 16

Both runs start from the same random initialisation (seed 42) and take the same batches of stage
0's examples (dialogue pretraining on chitchat + ESConv train: star_training.corpus) in the same
order, with star-train's optimiser (AdamW, lr 5e-4, 20 warm-up steps, clip 1.0). Printed: s/step
(the median over steps after the first 3, which warm caches up), the ratio float32/bf16, and the
mean training loss of the last 10 steps of each, the measure of "converges the same". Run nothing
else meanwhile: the two cores are shared.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DistributedSampler

from star_runtime.tokenizer import Tokenizer
from star_training.cli_common import DEFAULT_DATA, DEFAULT_TOKENIZER
from star_training.corpus import build_lm_examples, read_corpus
from star_training.data import collate
from star_training.model import trainable_parameters_for_stage
from star_training.schedules import linear_schedule
from star_training.trainer import TrainConfig, autocast_for, build_model, epoch_steps


def padding_share(examples, steps: list[list[list[int]]]) -> float:
    """1 - real tokens / padded tokens (source + target) over the micro-batches of `steps`."""
    real = padded = 0
    for step in steps:
        for micro in step:
            batch = [examples[i] for i in micro]
            real += sum(len(e.input_ids) + len(e.labels) for e in batch)
            padded += len(batch) * (max(len(e.input_ids) for e in batch) + max(len(e.labels) for e in batch))
    return 1 - real / padded


def run(precision: str, args: argparse.Namespace, tok: Tokenizer, examples, order) -> tuple[float, float]:
    cfg = TrainConfig(out="", data=str(args.data), tokenizer=str(args.tokenizer), stage="0", preset=args.preset)
    model = build_model(cfg, tok, None)
    params = trainable_parameters_for_stage(model, 0).params
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    scheduler = linear_schedule(optimizer, 20, 10 * args.steps)
    autocast = autocast_for(precision, torch.device("cpu"))
    model.train()
    times, losses = [], []
    for step in order[: args.steps]:
        t0 = time.perf_counter()
        batch = collate([examples[i] for i in step[0]], tok.pad_id)
        with autocast:
            out = model(**batch)
        out.loss_lm.float().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(out.loss_lm.item())
    return statistics.median(times[3:]), statistics.mean(losses[-10:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="compact")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    args = p.parse_args()
    torch.manual_seed(0)
    tok = Tokenizer.from_dir(args.tokenizer)
    examples = build_lm_examples([d for s in ("chitchat", "esconv-train") for d in read_corpus(s, args.data)], tok)
    sampler = DistributedSampler(examples, num_replicas=1, rank=0, shuffle=True, seed=42)
    lengths = [len(e.input_ids) + len(e.labels) for e in examples]
    plain = epoch_steps(sampler, 1, args.batch_size, 1)
    bucketed = epoch_steps(sampler, 1, args.batch_size, 1, lengths)
    print(f"{len(examples):,} examples; padding share of batches of {args.batch_size}: random "
          f"{padding_share(examples, plain):.3f}, length buckets {padding_share(examples, bucketed):.3f}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, {args.steps} steps")
    results = {}
    for order_name, order in (("random", plain), ("buckets", bucketed)):
        for precision in ("float32", "bf16"):
            torch.manual_seed(42)
            results[order_name, precision] = s, loss = run(precision, args, tok, examples, order)
            print(f"{order_name:8s} {precision:8s} {s:.3f} s/step  loss(last 10) {loss:.4f}", flush=True)
    for order_name in ("random", "buckets"):
        f32, bf16 = results[order_name, "float32"][0], results[order_name, "bf16"][0]
        print(f"{order_name}: float32/bf16 time ratio {f32 / bf16:.2f}")
    print(f"float32: random/buckets time ratio {results['random', 'float32'][0] / results['buckets', 'float32'][0]:.2f}")


if __name__ == "__main__":
    main()
