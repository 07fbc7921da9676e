"""star-train: fine-tune BlenderBot-Small with STAR on ESConv (SPEC section 1).

    star-train --stage 0 --preset compact --corpus chitchat --corpus esconv-train \
        --precision bf16 --length-buckets --out ~/star-runs/pretrain                # dialogue pretraining
    star-train --stage 1 --init ~/star-runs/pretrain/last --out runs/joint           # then fine-tune
    star-train --stage 1 --base facebook/blenderbot_small-90M --out runs/joint      # BlenderBot-Joint
    star-train --stage 2 --init runs/joint/best --out runs/star                     # + STAR
    star-train --stage single --preset tiny --epochs 4 --max-steps 5 --out /tmp/t   # a smoke run
    torchrun --nproc_per_node 4 -m star_training.train_cli --stage 1 ...            # DDP, same flags
    star-train --resume --out runs/joint                                            # after Ctrl-C

Every paper default (lr 3e-5, AdamW 0.9/0.999, warm-up 120, global batch 128, 10 epochs, 160/40
tokens, lambda0 0.8) is a flag. A resumed run takes its settings from the checkpoint; only
--max-steps, --device and --log-every may be given anew.

What it writes in OUT: last/ and best/ (checkpoints), log.jsonl and curves.png. It replaces them
only when they are its own (a checkpoint, a star-train log) and refuses to start otherwise; it
first cleans what a killed save left (run_state.recover_run_folder). A full disk stops the run
with one line and the previous checkpoint intact: free space and continue with --resume.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from star_training.checkpoint import CheckpointError, check_replaceable
from star_training.cli_common import (
    DEFAULT_TOKENIZER,
    CliError,
    Failure,
    add_common_args,
    find_tokenizer,
    nonnegative_int,
    positive_float,
    positive_int,
    os_error_message,
    resolve_data_path,
    run_cli,
    unit_interval,
)
from star_training.config import PRESETS
from star_training.distributed import barrier, setup, teardown
from star_training.progress import is_training_log
from star_training.run_state import find_run_checkpoint, load_trainer_state, recover_run_folder
from star_training.trainer import BEST, CURVES, LAST, LOG, PRECISIONS, TrainConfig, Trainer, lambda_for_epoch

PROG = "star-train"
HUB_BASE = "facebook/blenderbot_small-90M"
DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.name not in ("out", "data", "tokenizer")}
RESUMABLE = {"max_steps", "device", "log_every", "save_every"}  # may change on --resume, same result
STAGE0_CORPORA = ["chitchat", "esconv-train"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Every default is None here so that we can tell which flags were given (for --resume);
    # the real defaults are TrainConfig's, shown in the help.
    d = DEFAULTS
    run = p.add_argument_group("run")
    run.add_argument("--stage", choices=("0", "1", "2", "single"), default=None,
                     help="0: dialogue pretraining on --corpus conversations (language-model loss only, STAR "
                     "bypassed); 1: BlenderBot-Joint (STAR bypassed); 2: train only STAR and the shared embedding, "
                     "from a stage-1 --init; single: everything with STAR (default: 1)")
    run.add_argument("--corpus", action="append", default=None, metavar="SOURCE",
                     help="stage 0's conversations, repeatable: chitchat (the chitchat-dataset package), "
                     "esconv-train (every utterance of --data's train split) or a JSON Lines file of "
                     "{\"turns\": [[speaker, text], ...]} (default: chitchat and esconv-train)")
    src = run.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=tuple(PRESETS), default=None, help="random initialisation of this size")
    src.add_argument("--base", default=None,
                     help=f"BlenderBot-Small weights to fine-tune: a hub name or a local folder (default: {HUB_BASE})")
    src.add_argument("--init", type=Path, default=None, help="a star-train checkpoint folder to start from")
    add_common_args(p)
    run.add_argument("--tokenizer", type=Path, default=None,
                     help=f"tokenizer folder (default: the --init/--base folder when it has one, else {DEFAULT_TOKENIZER})")
    run.add_argument("--out", type=Path, default=None, help="output folder (default: runs/stage-STAGE)")
    run.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    run.add_argument("--max-steps", type=positive_int, default=None,
                     help="stop after this many optimizer steps in all (the schedule still spans --epochs)")
    run.add_argument("--save-every", type=positive_float, default=None, metavar="MINUTES",
                     help=f"also write OUT/last every this many minutes within an epoch (default: {d['save_every']})")
    run.add_argument("--precision", choices=PRECISIONS, default=None,
                     help="autocast of the forward passes: auto is bf16 on CUDA and float32 on the CPU (default: auto)")
    run.add_argument("--log-every", type=positive_int, default=None,
                     help=f"plain-text progress line every N steps when not on a terminal (default: {d['log_every']})")

    opt = p.add_argument_group("optimisation (paper defaults)")
    opt.add_argument("--epochs", type=positive_int, default=None, help=f"(default: {d['epochs']})")
    opt.add_argument("--lr", type=positive_float, default=None, help=f"peak learning rate (default: {d['lr']})")
    opt.add_argument("--beta1", type=unit_interval, default=None, help=f"AdamW beta1 (default: {d['beta1']})")
    opt.add_argument("--beta2", type=unit_interval, default=None, help=f"AdamW beta2 (default: {d['beta2']})")
    opt.add_argument("--weight-decay", type=unit_interval, default=None, help=f"(default: {d['weight_decay']})")
    opt.add_argument("--warmup-steps", type=nonnegative_int, default=None,
                     help=f"linear warm-up, then linear decay to 0 (default: {d['warmup_steps']})")
    opt.add_argument("--batch-size", type=positive_int, default=None,
                     help=f"micro-batch per process (default: {d['batch_size']})")
    opt.add_argument("--grad-accum", type=positive_int, default=None,
                     help="micro-batches per optimizer step (default: global batch / (batch size x processes))")
    opt.add_argument("--global-batch", type=positive_int, default=None,
                     help=f"examples per optimizer step over all processes (default: {d['global_batch']})")
    opt.add_argument("--clip-norm", type=positive_float, default=None,
                     help=f"gradient norm clipping (default: {d['clip_norm']})")
    opt.add_argument("--lambda0", type=unit_interval, default=None,
                     help=f"strategy-loss weight scale: lambda(E) = lambda0 log(E+1)/log(E_max) (default: {d['lambda0']})")
    opt.add_argument("--dropout", type=unit_interval, default=None,
                     help="hidden-state dropout of the base (default: the model config's, 0.1)")
    data = p.add_argument_group("data")
    data.add_argument("--max-source", type=positive_int, default=None, help=f"(default: {d['max_source']})")
    data.add_argument("--max-target", type=positive_int, default=None, help=f"(default: {d['max_target']})")
    data.add_argument("--no-situation", action="store_true",
                      help="leave the situation out of the context (thu-coai BlenderBot-Joint parity)")
    data.add_argument("--length-buckets", action="store_true", default=None,
                      help="cut micro-batches from length-sorted runs of the shuffled examples (less padding)")
    return p


def _given(args: argparse.Namespace) -> dict:
    """The TrainConfig fields set on the command line."""
    given = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    if args.no_situation:
        given["use_situation"] = False
    if args.corpus is not None:
        given["corpora"] = [str(Path(c).resolve()) if Path(c).is_file() else c for c in args.corpus]
    return given


def _fresh_config(args: argparse.Namespace, world_size: int) -> TrainConfig:
    given = _given(args)
    stage = given.get("stage", DEFAULTS["stage"])
    if stage == "2" and args.init is None:
        raise CliError("--stage 2 trains STAR on a stage-1 model: give its checkpoint with --init")
    if stage == "0":
        given.setdefault("corpora", STAGE0_CORPORA)
    elif "corpora" in given:
        raise CliError("--corpus names stage 0's pretraining conversations; stages 1, 2 and single train on --data")
    if not (args.preset or args.base or args.init):
        given["base"] = HUB_BASE
    for key in ("init", "base"):  # absolute, so that --resume from elsewhere finds them
        if key in given and Path(given[key]).exists():
            given[key] = str(Path(given[key]).resolve())
    if args.grad_accum is not None:
        batch = given.get("batch_size", DEFAULTS["batch_size"])
        implied = batch * args.grad_accum * world_size
        if given.get("global_batch", implied) != implied:
            raise CliError(f"--global-batch {given['global_batch']} disagrees with --batch-size {batch} x "
                           f"--grad-accum {args.grad_accum} x {world_size} process(es) = {implied}")
        given["global_batch"] = implied
    out = _out(args)
    cfg = TrainConfig(
        out=str(out.resolve()), data=str(resolve_data_path(args.data).resolve()),
        tokenizer=str(find_tokenizer(args.tokenizer, args.init, args.base).resolve()), **given,
    )
    lam = 0.0 if cfg.stage == "0" else lambda_for_epoch(cfg.epochs, cfg.epochs, cfg.lambda0)
    if lam > 1:
        raise CliError(
            f"with --epochs {cfg.epochs} and --lambda0 {cfg.lambda0}, lambda reaches {lam:.2f} > 1 in the last epoch, "
            "which would weigh L_LM negatively; lower --lambda0 or train more epochs"
        )
    return cfg


def _same_setting(key: str, given: object, saved: object) -> bool:
    if key in ("data", "tokenizer", "init", "base") and saved is not None and Path(str(given)).exists():
        return Path(str(given)).resolve() == Path(str(saved))
    return str(given) == str(saved)


def _recover(out: Path) -> None:
    """Clean what a killed save left in OUT, saying what was done (before anything reads OUT)."""
    if out.is_dir():
        for note in recover_run_folder(out):
            print(f"{PROG}: {note}", file=sys.stderr)


def _out(args: argparse.Namespace) -> Path:
    return args.out or Path("runs") / f"stage-{args.stage or DEFAULTS['stage']}"


def _resumed_config(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    out = _out(args)
    found = find_run_checkpoint(out / LAST)
    if found is None:
        raise CliError(f"--resume: no run checkpoint in {out / LAST} (it is written after the first epoch, "
                       "at --max-steps or on Ctrl-C)")
    try:
        saved = load_trainer_state(found)["run_config"]
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise CliError(f"--resume: cannot read the trainer state in {found}: {e}; start a new run with another "
                       "--out") from e
    given = _given(args) | {k: getattr(args, k) for k in ("data", "tokenizer") if getattr(args, k) is not None}
    changed = [
        f"--{k.replace('_', '-')} {v} (the run used {saved.get(k)})"
        for k, v in given.items()
        if k not in RESUMABLE and not _same_setting(k, v, saved.get(k))
    ]
    if changed:
        raise CliError("--resume continues a run with its own settings; these differ: " + ", ".join(changed))
    saved.update(out=str(out.resolve()), max_steps=given.get("max_steps"),
                 save_every=given.get("save_every", saved.get("save_every", DEFAULTS["save_every"])),
                 device=given.get("device", DEFAULTS["device"]), log_every=given.get("log_every", DEFAULTS["log_every"]))
    return TrainConfig(**saved), found


def _prepare_out(cfg: TrainConfig, resuming: bool) -> None:
    """Check that everything the run will write in OUT is absent or its own, before minutes of work."""
    out = Path(cfg.out)
    if not resuming and find_run_checkpoint(out / LAST) is not None:
        raise CliError(f"{out} already holds a run ({out / LAST}); continue it with --resume or choose another --out")
    for name in (LAST, BEST):
        try:
            check_replaceable(out / name)
        except CheckpointError:
            raise CliError(f"{out / name} exists and is not a star-train checkpoint, so star-train will not replace "
                           "it; move it away or choose another --out") from None
    log, curves = out / LOG, out / CURVES
    ours = log.is_file() and is_training_log(log)
    for path in (log, curves):
        if (path.exists() or path.is_symlink()) and not ours:
            raise CliError(f"{path} exists and is not from a star-train run, so star-train will not replace it; "
                           "move it away or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CliError(f"cannot write to --out {out}: {e.strerror or e}; choose another --out") from e


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        ctx = setup(args.device or DEFAULTS["device"])
        try:
            if ctx.is_main:  # one process cleans up, before any of them reads OUT
                _recover(_out(args))
            barrier(ctx)
            if args.resume:
                cfg, resume_dir = _resumed_config(args)
            else:
                cfg, resume_dir = _fresh_config(args, ctx.world_size), None
            try:
                cfg.grad_accum(ctx.world_size)
            except ValueError as e:
                raise CliError(str(e)) from e
            if ctx.is_main:
                _prepare_out(cfg, resume_dir is not None)
            try:
                return Trainer(cfg, ctx, resume_dir=resume_dir).run()
            except OSError as e:  # a full disk mid-run: the last checkpoint written is intact
                saved = find_run_checkpoint(Path(cfg.out) / LAST) is not None
                then = (f"continue with star-train --resume --out {cfg.out}" if saved
                        else "run the same command again")
                raise Failure(os_error_message(e, then)) from None
        finally:
            teardown(ctx)

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
