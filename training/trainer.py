"""The training loop of star-train: one process or a torchrun group, stage 0, 1, 2 or single.

Objective per optimizer step, over the GLOBAL batch G (all micro-batches of all ranks):

    L = (1 - lambda(E)) * sum_G NLL / tokens_G  +  lambda(E) * sum_G CE_strategy / |G|

with lambda(E) = lambda0 log(E + 1) / log(E_max) (`losses.dynamic_lambda`); stage 0 (dialogue
pretraining on `--corpus` conversations, star_training.corpus) has no strategy target: lambda = 0. Both sums are
normalised by the global counts (all-reduced before the backward pass), so splitting G into
micro-batches or ranks changes nothing but float summation order: 1 process x 2 micro-batches
and 2 processes x 1 micro-batch take the same step. Each rank's backward uses its share times
the world size, because DDP averages gradients over the ranks.

    global batch = micro-batch (--batch-size) x gradient accumulation x processes  (paper: 128)

Data order: DistributedSampler with the run's seed and `set_epoch(E)`: one permutation of the
training examples per epoch, a pure function of (seed, E); rank r takes every world-th index.
A resumed run rebuilds the same order and skips the steps already taken. With length buckets,
each run of LENGTH_BUCKET micro-batches of that permutation is sorted by length before it is cut,
and the micro-batches are then shuffled (by seed and E): less padding, the same examples per epoch.
Checkpoints: OUT/last at every epoch's end and every --save-every minutes, so a stopped run loses
minutes, not an epoch.
"""

from __future__ import annotations

import contextlib
import io
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from transformers.models.blenderbot_small.modeling_blenderbot_small import BlenderbotSmallAttention

from star_runtime.cli import EXIT_INTERRUPTED, EXIT_OK
from star_runtime.terminal import printable
from star_runtime.tokenizer import Tokenizer
from star_training.checkpoint import (RUN_BEST, RUN_LAST, STAR_CONFIG_FILE, CheckpointError, is_star_folder,
                                      load_model)
from star_training.config import StarConfig
from star_training.corpus import build_lm_examples, read_corpus, read_esconv
from star_training.data import DataError, Example, build_examples, collate, load_conversations
from star_training.distributed import DistContext, all_reduce_sum, barrier
from star_training.model import IGNORE_INDEX, StarForConditionalGeneration, trainable_parameters_for_stage
from star_training.progress import JsonlLog, TrainingDisplay, next_attempt, plot_curves
from star_training.run_state import (
    Position,
    gather_rng_states,
    load_trainer_state,
    save_model_folder,
    save_run_checkpoint,
    set_rng_state,
)
from star_training.schedules import dynamic_lambda, linear_schedule
from star_training.teacher_forced import teacher_forced_scores

LAST, BEST, LOG, CURVES = RUN_LAST, RUN_BEST, "log.jsonl", "curves.png"
LENGTH_BUCKET = 64  # micro-batches sorted together: random batches of 16 on stage 0's data are 20% padding
PRECISIONS = ("auto", "float32", "bf16")


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in its checkpoints, restored by --resume."""

    out: str
    data: str
    tokenizer: str
    stage: str = "1"  # "0": dialogue pretraining; "1": BlenderBot-Joint; "2": STAR + embedding; "single": all
    preset: str | None = None  # exactly one of preset / base / init names the starting weights
    base: str | None = None
    init: str | None = None
    epochs: int = 10
    lr: float = 3e-5
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0  # thu-coai's ESConv code and transformers' Trainer use 0
    warmup_steps: int = 120
    batch_size: int = 32  # micro-batch per process
    global_batch: int = 128  # micro-batch x accumulation x processes
    clip_norm: float = 1.0  # thu-coai's max_grad_norm; the paper does not say
    max_source: int = 160
    max_target: int = 40
    use_situation: bool = True
    lambda0: float = 0.8
    dropout: float | None = None  # None: the model config's (0.1 in BlenderBot-Small)
    seed: int = 42
    max_steps: int | None = None  # stop after this many optimizer steps (schedule unchanged)
    log_every: int = 10
    device: str = "auto"
    corpora: list[str] | None = None  # stage 0: star_training.corpus sources
    precision: str = "auto"  # autocast: "auto" is bf16 on CUDA, float32 on the CPU
    length_buckets: bool = False
    save_every: float = 10.0  # minutes between OUT/last checkpoints within an epoch

    def grad_accum(self, world_size: int) -> int:
        per_step = self.batch_size * world_size
        if self.global_batch % per_step:
            raise ValueError(
                f"the global batch {self.global_batch} is not a multiple of --batch-size {self.batch_size} "
                f"x {world_size} process(es)"
            )
        return self.global_batch // per_step


def lambda_for_epoch(epoch: int, epochs: int, lambda0: float) -> float:
    """dynamic_lambda; a one-epoch run (log E_max = 0 leaves it undefined) uses lambda0."""
    return lambda0 if epochs == 1 else dynamic_lambda(epoch, epochs, lambda0)


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward passes' autocast: bf16 where asked (or on CUDA for "auto"), else none."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def stage_key(stage: str) -> int | str:
    return "single" if stage == "single" else int(stage)


def set_dropout(model: StarForConditionalGeneration, p: float) -> None:
    """Change the base's hidden-state dropout after construction.

    transformers copies config.dropout into a float on the encoder, the decoder and each of their
    layers when they are built; attention modules keep attention_dropout under the same name.
    """
    model.config.dropout = p
    for module in model.base.modules():
        if isinstance(getattr(module, "dropout", None), float) and not isinstance(module, BlenderbotSmallAttention):
            module.dropout = p


def build_model(cfg: TrainConfig, tok: Tokenizer, resume_dir: Path | None) -> StarForConditionalGeneration:
    """The starting model: a resumed checkpoint, --init, --base or a random --preset."""
    if resume_dir is not None:
        model = load_model(resume_dir, vocab_size=tok.vocab_size)
    elif cfg.init is not None:
        if not is_star_folder(cfg.init):
            raise CheckpointError(f"--init {cfg.init}: no {STAR_CONFIG_FILE}, so not a star-train checkpoint "
                                  "(BlenderBot-Small weights go to --base)")
        # A stage-1 checkpoint's STAR weights were never trained: they are still their
        # near-identity initialisation, which is where stage 2 starts.
        model = load_model(cfg.init, vocab_size=tok.vocab_size)
    else:
        star = StarConfig(strategy_token_ids=tok.strategy_ids)
        source = {"preset": cfg.preset} if cfg.preset else {"name_or_path": cfg.base}
        model = load_model(**source, star_config=star, vocab_size=tok.vocab_size)
    model.star_config.lambda0 = cfg.lambda0
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    return model


def epoch_steps(
    sampler: DistributedSampler, epoch: int, micro: int, accum: int, lengths: list[int] | None = None
) -> list[list[list[int]]]:
    """This rank's optimizer steps of one epoch, each a list of micro-batches of example indices.

    With `lengths` (one per example), micro-batches are cut from length-sorted runs of
    LENGTH_BUCKET micro-batches of the permutation and then shuffled (module doc)."""
    sampler.set_epoch(epoch)
    order = list(sampler)
    if lengths is not None:
        size = micro * LENGTH_BUCKET
        order = [i for k in range(0, len(order), size) for i in sorted(order[k : k + size], key=lengths.__getitem__)]
    micro_batches = [order[i : i + micro] for i in range(0, len(order), micro)]
    if lengths is not None:
        random.Random(f"{sampler.seed}/{epoch}").shuffle(micro_batches)
    return [micro_batches[i : i + accum] for i in range(0, len(micro_batches), accum)]


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """One run. `run()` returns the exit status: 0 done (or --max-steps reached), 130 interrupted."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, *, resume_dir: Path | None = None) -> None:
        self.cfg, self.ctx, self.out = cfg, ctx, Path(cfg.out)
        self.accum = cfg.grad_accum(ctx.world_size)
        torch.manual_seed(cfg.seed)  # the model's random initialisation
        tok_dir = resume_dir if resume_dir is not None else Path(cfg.tokenizer)
        self.tok = Tokenizer.from_dir(tok_dir)

        def examples(split: str) -> list[Example]:
            if cfg.stage == "0":  # every utterance of the corpora; validation: ESConv's valid split
                dialogues = ([d for source in cfg.corpora or () for d in read_corpus(source, cfg.data)]
                             if split == "train" else read_esconv(cfg.data, split, cfg.use_situation))
                found = build_lm_examples(dialogues, self.tok, max_source=cfg.max_source, max_target=cfg.max_target)
                what = f"the corpora {cfg.corpora}" if split == "train" else f"{cfg.data}'s {split} split"
            else:
                found = build_examples(
                    load_conversations(cfg.data, split), self.tok,
                    max_source=cfg.max_source, max_target=cfg.max_target, use_situation=cfg.use_situation,
                )
                what = f"{cfg.data}: the {split} split"
            if not found:
                raise DataError(f"{what} has no turn to learn from")
            return found

        self.train_examples = examples("train")
        self.valid_examples = examples("valid")
        self.lengths = ([len(e.input_ids) + len(e.labels) for e in self.train_examples]
                        if cfg.length_buckets else None)

        self.model = build_model(cfg, self.tok, resume_dir)
        quiet = contextlib.nullcontext() if ctx.is_main else contextlib.redirect_stdout(io.StringIO())
        with quiet:  # the trainable-parameter count, printed once
            self.trainable = trainable_parameters_for_stage(self.model, stage_key(cfg.stage))
        self.model.to(ctx.device)
        self.ddp = (
            DistributedDataParallel(self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
            if ctx.distributed
            else self.model
        )
        self.sampler = DistributedSampler(
            self.train_examples, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed
        )
        self.steps_per_epoch = len(epoch_steps(self.sampler, 1, cfg.batch_size, self.accum, self.lengths))
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(
            self.trainable.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
        )
        self.scheduler = linear_schedule(self.optimizer, cfg.warmup_steps, self.total_steps)
        self.position = Position()
        self.resumed = resume_dir is not None
        self._stop = StopRequest()
        if resume_dir is not None:
            state = load_trainer_state(resume_dir)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.position = Position(**state["position"])
            rng = state["rng"]
            set_rng_state(rng[ctx.rank] if ctx.rank < len(rng) else rng[0], ctx.device)
        self.autocast = autocast_for(cfg.precision, ctx.device)
        self._saved_at = time.monotonic()
        if ctx.device.type == "cuda":
            # Under bf16 autocast the decoder's final LayerNorm still outputs float32, and the fused
            # STAR kernel runs float32 only with TF32 allowed (with IEEE float32 dots it measured
            # 2.4x slower than eager on an H200: docs/kernel.md). TF32 is what nanoGPT trains with.
            torch.set_float32_matmul_precision("high")

    # -- one optimizer step ------------------------------------------------------------------------

    def train_step(self, micro_indices: list[list[int]], lam: float) -> tuple[dict[str, float], bool]:
        """Forward/backward over this rank's micro-batches, then one optimizer step.

        Returns the step's global record and whether any rank asked to stop."""
        t0 = time.perf_counter()
        batches = [collate([self.train_examples[i] for i in ix], self.tok.pad_id) for ix in micro_indices]
        counts = torch.tensor(  # on the CPU tensors, before they move: no device sync per item
            [[(b["labels"][:, 1:] != IGNORE_INDEX).sum(), b["labels"].shape[0],
              b["attention_mask"].sum() + b["decoder_attention_mask"].sum()] for b in batches],
            dtype=torch.float64,
        ).sum(0).to(self.ctx.device)
        batches = [{k: v.to(self.ctx.device, non_blocking=True) for k, v in b.items()} for b in batches]
        n_tokens, n_examples, n_seen = all_reduce_sum(counts, self.ctx).tolist()
        sums = torch.zeros(4, dtype=torch.float64, device=self.ctx.device)  # NLL, strategy CE, stop, save due
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or not self.ctx.distributed else self.ddp.no_sync()
            with sync:
                with self.autocast:
                    out = self.ddp(**batch)
                nll = out.nll_sum.float()
                st = out.loss_st.float() * batch["labels"].shape[0] if out.loss_st is not None else nll * 0
                loss = ((1 - lam) * nll / n_tokens + lam * st / n_examples) * self.ctx.world_size
                loss.backward()
            sums[0] += nll.detach().double()
            sums[1] += st.detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable.params, self.cfg.clip_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums[2] = float(self._stop.requested)
        # rank 0's clock decides, so that every rank joins the same save
        sums[3] = float(self.ctx.is_main and time.monotonic() - self._saved_at >= 60 * self.cfg.save_every)
        nll_sum, st_sum, stop, save = all_reduce_sum(sums, self.ctx).tolist()
        self.save_due = save > 0
        loss_lm, loss_st = nll_sum / n_tokens, st_sum / n_examples
        record = {
            "loss": (1 - lam) * loss_lm + lam * loss_st, "loss_lm": loss_lm, "loss_st": loss_st,
            "lambda": lam, "lr": lr, "grad_norm": float(grad_norm),
            "step_s": (dt := time.perf_counter() - t0), "tokens_per_s": n_seen / dt,
        }
        return record, stop > 0

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_last(self) -> None:
        self._saved_at = time.monotonic()
        rng = gather_rng_states(self.ctx)  # every rank takes part
        if self.ctx.is_main:
            save_run_checkpoint(
                self.out / LAST, self.model, self.tok, optimizer=self.optimizer, scheduler=self.scheduler,
                position=self.position, run_config=asdict(self.cfg), rng_states=rng,
            )
        barrier(self.ctx)

    def validate(self, epoch: int, log: JsonlLog | None, display: TrainingDisplay | None) -> None:
        """Rank 0 scores the valid split, keeps OUT/best at the lowest LM loss; others wait."""
        if self.ctx.is_main:
            scores = teacher_forced_scores(
                self.model, self.valid_examples, pad_id=self.tok.pad_id, batch_size=self.cfg.batch_size,
                device=self.ctx.device, autocast=self.autocast,
            )
            # Best = lowest validation LM loss (= PPL, the model-selection measure of ESConv work);
            # the weighted loss cannot be compared across epochs because lambda changes.
            improved = scores["loss_lm"] < self.position.best_val
            if improved:
                self.position.best_val = scores["loss_lm"]
                save_model_folder(self.out / BEST, self.model, self.tok, asdict(self.cfg))
            log.write({"kind": "valid", "epoch": epoch, "step": self.position.global_step, **scores, "best": improved})
            strategy = (f", loss_st {scores['loss_st']:.4f}, strategy acc {scores['strategy_accuracy']:.1f}%"
                        if "loss_st" in scores else "")
            display.message(
                f"valid epoch {epoch}: loss_lm {scores['loss_lm']:.4f} (PPL {scores['ppl']:.2f}){strategy}"
                + (" (best so far)" if improved else "")
            )
        best = torch.tensor([self.position.best_val], dtype=torch.float64, device=self.ctx.device)
        if self.ctx.distributed:
            torch.distributed.broadcast(best, src=0)
        self.position.best_val = best.item()

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> int:
        cfg, pos = self.cfg, self.position
        if pos.epoch > cfg.epochs or (cfg.max_steps is not None and pos.global_step >= cfg.max_steps):
            self._say(f"nothing to do: {self.out / LAST} is at step {pos.global_step} of {self.total_steps}")
            return EXIT_OK
        attempt = next_attempt(self.out / LOG) if self.resumed else 1
        log = JsonlLog(self.out / LOG, append=self.resumed, attempt=attempt) if self.ctx.is_main else None
        last_step = min(self.total_steps, cfg.max_steps or self.total_steps)
        display = TrainingDisplay(
            last_step, pos.global_step, every=cfg.log_every
        ) if self.ctx.is_main else None
        try:
            with self._stop, display or contextlib.nullcontext():
                if log is not None:
                    # "step": where this attempt starts; a resumed one repeats the steps its
                    # predecessor logged after the checkpoint (progress.current_records).
                    log.write({"kind": "start", "step": pos.global_step, "world_size": self.ctx.world_size,
                               "grad_accum": self.accum, "total_steps": self.total_steps,
                               "trainable_parameters": self.trainable.n_trainable, "config": asdict(cfg)})
                status = self._loop(log, display)
        finally:
            if log is not None:
                log.close()
        if self.ctx.is_main and status == EXIT_OK:
            plot_curves(self.out / LOG, self.out / CURVES)
            self._say(f"curves: {self.out / CURVES}; log: {self.out / LOG}")
        return status

    def _loop(self, log: JsonlLog | None, display: TrainingDisplay | None) -> int:
        cfg, pos = self.cfg, self.position
        self.model.train()
        while pos.epoch <= cfg.epochs:
            lam = 0.0 if cfg.stage == "0" else lambda_for_epoch(pos.epoch, cfg.epochs, cfg.lambda0)
            steps = epoch_steps(self.sampler, pos.epoch, cfg.batch_size, self.accum, self.lengths)
            while pos.step_in_epoch < len(steps):
                record, stop = self.train_step(steps[pos.step_in_epoch], lam)
                pos.step_in_epoch += 1
                pos.global_step += 1
                if self.ctx.is_main:
                    record = {"kind": "train", "epoch": pos.epoch, "step": pos.global_step, **record}
                    log.write(record)
                    display.step(record)
                if stop:
                    self.save_last()
                    self._say(
                        f"interrupted after step {pos.global_step} (epoch {pos.epoch}); checkpoint saved to "
                        f"{self.out / LAST}; continue with: star-train --resume --out {self.out}"
                    )
                    return EXIT_INTERRUPTED
                if cfg.max_steps is not None and pos.global_step >= cfg.max_steps:
                    self.save_last()
                    self._say(f"stopped at --max-steps {cfg.max_steps}; checkpoint saved to {self.out / LAST}")
                    return EXIT_OK
                if self.save_due and pos.step_in_epoch < len(steps):
                    self.save_last()
            self.validate(pos.epoch, log, display)
            pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
            self.save_last()
        self._say(f"done: {cfg.epochs} epochs, {pos.global_step} steps; model {self.out / LAST}, "
                  f"best validation model {self.out / BEST}")
        return EXIT_OK

    def _say(self, text: str) -> None:
        if self.ctx.is_main:
            print(printable(text), flush=True)
