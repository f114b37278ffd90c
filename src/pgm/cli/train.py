"""`pgm prepare`, `pgm train`, `pgm consolidate` and `pgm distill`: the commands that make runs."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import ConfigError, RunError
from .common import run_configuration


def register(commands) -> None:
    train = commands.add_parser("train", help="train a model (one process, or many under torchrun)")
    train.add_argument("--preset", help="a named configuration (default text-small); see pgm.presets")
    train.add_argument("--config", help="a JSON file with model/data/train sections laid over the preset")
    train.add_argument("--out", help="the run directory (default runs/PRESET)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="settings such as model.hidden_size=256 train.lr=1e-3 (or lr=1e-3 when unambiguous)")
    train.set_defaults(handler=cmd_train)

    prepare = commands.add_parser("prepare", help="tokenize and pack a corpus once, in parallel and resumably, into "
                                                  "a data directory that runs use in place (data.prepared=DIR)")
    prepare.add_argument("--out", required=True, help="the data directory (a rerun of the same command continues an "
                                                      "interrupted preparation)")
    prepare.add_argument("--preset", help="the preset whose data settings and row length to prepare (default "
                                          "text-small)")
    prepare.add_argument("--config", help="a JSON file whose data (and model.length) settings are laid over the "
                                          "preset's")
    prepare.add_argument("--workers", type=int, help="processes that tokenize (default: the usable cores)")
    prepare.add_argument("overrides", nargs="*", metavar="key=value",
                         help="data settings such as data.source=corpus.jsonl data.tokenizer=gpt2, and length=N")
    prepare.set_defaults(handler=cmd_prepare)

    consolidate = commands.add_parser("consolidate", help="turn a sharded (train.parallel=fsdp) checkpoint into "
                                                          "our usual files, readable without torch.distributed")
    consolidate.add_argument("run", help="the run directory")
    which = consolidate.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="the checkpoint of this step (default: the latest)")
    which.add_argument("--all", action="store_true", help="every sharded checkpoint of the run")
    consolidate.set_defaults(handler=cmd_consolidate)

    distill = commands.add_parser("distill", help="distil a text PGM or MDLM into a few-step sampler (multi-round "
                                                  "SDTT)")
    distill.add_argument("teacher", nargs="?", help="the model to distil: a run or pretrained directory, or an "
                                                    "authors' text checkpoint")
    distill.add_argument("--preset", help="the distillation settings (default distill-small); see pgm.presets")
    distill.add_argument("--out", help="the distillation's run directory (default runs/TEACHER-distilled)")
    distill.add_argument("--resume", action="store_true", help="continue the distillation in --out")
    distill.add_argument("overrides", nargs="*", metavar="key=value",
                         help="settings such as distill.round_steps=500 distill.divergence=kl-fwd train.lr=1e-4")
    distill.set_defaults(handler=cmd_distill)


def cmd_train(args) -> int:
    from ..runs import read_run_config
    from ..train import train

    if args.resume:
        if args.preset or args.config:
            raise ConfigError("--resume continues the saved configuration; drop --preset and --config")
        if not args.out:
            raise ConfigError("--resume needs --out RUN_DIR, the run to continue")
        config = read_run_config(Path(args.out)).with_overrides(args.overrides)
    else:
        config = run_configuration(args)
    out = Path(args.out or Path("runs") / (args.preset or "text-small"))
    started = time.perf_counter()
    train(config, out, resume=args.resume)
    _wall_time(started)
    return 0


def cmd_prepare(args) -> int:
    from ..data import prepare_text, prepared_meta

    config = run_configuration(args)
    for item in args.overrides:
        section, field = config.locate(item.partition("=")[0])
        if section != "data" and (section, field) != ("model", "length"):
            raise ConfigError(f"{section}.{field}: pgm prepare reads the data settings and the row length (length=N), "
                              "nothing else")
    if config.data.is_image:
        raise ConfigError("pgm prepare prepares text; image data is encoded by the run that trains on it")
    if config.data.prepared:
        raise ConfigError("data.prepared names data to use, not to make: pass --out DATA_DIR instead")
    if config.data.format == "pairs":
        raise ConfigError("pairs (data.format=pairs) are prepared by the run that fine-tunes on them, pgm train")
    out = Path(args.out)
    before = prepared_meta(out)
    started = time.perf_counter()
    meta = prepare_text(config.data, config.model.length, out, workers=args.workers, progress=True)
    if before is not None:  # of another recipe, preparing would have refused
        print(f"{out} already holds this recipe's data ({meta['train_rows']} training and {meta['val_rows']} "
              "validation rows); nothing to do")
    else:
        print(f"wall time {time.perf_counter() - started:.0f} s")
    preset_flag = f" --preset {args.preset}" if args.preset else ""
    print(f"train on it in place: pgm train{preset_flag} data.prepared={out}")
    return 0


def cmd_consolidate(args) -> int:
    from ..runs import CHECKPOINTS, checkpoint_dirs, consolidate_checkpoint, is_sharded

    run_dir = Path(args.run)
    found = checkpoint_dirs(run_dir)
    if not found:
        raise RunError(f"{run_dir} has no checkpoint (is it a run directory?)")
    if args.step is not None:
        wanted = run_dir / CHECKPOINTS / f"step_{args.step:07d}"
        if wanted not in found:
            raise RunError(f"{run_dir} has no checkpoint of step {args.step} (it has steps "
                           f"{', '.join(str(int(p.name[5:])) for p in found)})")
        found = [wanted]
    elif not args.all:
        found = found[-1:]
    sharded = [checkpoint for checkpoint in found if is_sharded(checkpoint)]
    if not sharded:
        raise RunError(f"{', '.join(str(p) for p in found)}: nothing to consolidate (not sharded, or done already)")
    for checkpoint in sharded:
        consolidate_checkpoint(checkpoint)
        print(f"{checkpoint}: model.safetensors, ema.safetensors and optimizer.pt written beside sharded/")
    return 0


def cmd_distill(args) -> int:
    from ..distill import distill, distillation_config
    from ..presets import distill_preset
    from ..runs import read_run_config

    overrides = list(args.overrides)
    if args.teacher is not None and "=" in args.teacher and not Path(args.teacher).exists():
        overrides.insert(0, args.teacher)  # `pgm distill --resume --out RUN key=value`: no teacher given
        args.teacher = None
    teacher = None
    if args.resume:
        if args.teacher is not None or args.preset:
            raise ConfigError("--resume continues the saved distillation; drop the teacher and --preset")
        if not args.out:
            raise ConfigError("--resume needs --out RUN_DIR, the distillation to continue")
        if any(item.partition("=")[0].rpartition(".")[2] == "max_steps" for item in overrides):
            raise ConfigError("a distillation's length is distill.round_steps x its rounds, fixed when it started")
        config = read_run_config(Path(args.out)).with_overrides(overrides)
        if config.distill is None:
            raise ConfigError(f"{args.out} is a training run, not a distillation: continue it with pgm train --resume")
        out = Path(args.out)
    else:
        if args.teacher is None:
            raise ConfigError("name the teacher to distil: pgm distill TEACHER --out RUN")
        config, teacher = distillation_config(args.teacher, *distill_preset(args.preset or "distill-small"), overrides)
        out = Path(args.out or Path("runs") / f"{Path(args.teacher).name}-distilled")
    started = time.perf_counter()
    distill(config, out, resume=args.resume, teacher=teacher)
    _wall_time(started)
    return 0


def _wall_time(started: float) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # one voice per run
        print(f"wall time {time.perf_counter() - started:.0f} s")
