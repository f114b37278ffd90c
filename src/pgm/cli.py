"""The `pgm` command line: prepare, train, distill, sample, eval, report, convert, serve, bench.

Mistakes in what the user asked for (an unknown preset or setting, a wrong value, missing data,
a directory that is not a run, a damaged checkpoint) end with one sentence on stderr and exit
code 2. Set PGM_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

from . import __version__
from .allocator import keep_freed_memory
from .devices import PRECISIONS
from .presets import IMAGE_SHAPES
from .sampling.compiled import COMPILE_CHOICES, COMPILE_MODES, compile_mode


def _load_config_file(path: str) -> dict:
    try:
        values = json.loads(Path(path).read_text())
    except OSError:
        raise ValueError(f"cannot read the config file {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise ValueError(f"the config file {path} must hold a JSON object with model, data and train sections, "
                         f"not a {type(values).__name__}")
    return values


def _run_configuration(args):
    """The preset (default text-small), with the config file's sections laid over it, then the
    key=value overrides."""
    from .presets import preset
    from .runs import RunConfig

    values = preset(args.preset or "text-small").to_dict()
    if args.config:
        for section, fields in _load_config_file(args.config).items():
            if not isinstance(fields, dict):
                raise ValueError(f"the config file's {section!r} section must be an object")
            if section == "model" and fields.get("kind", values["model"]["kind"]) != values["model"]["kind"]:
                values["model"] = fields
            else:
                values.setdefault(section, {}).update(fields)
    return RunConfig.from_dict(values).with_overrides(args.overrides)


def cmd_train(args) -> int:
    from .runs import read_run_config
    from .train import train

    if args.resume:
        if args.preset or args.config:
            raise ValueError("--resume continues the saved configuration; drop --preset and --config")
        if not args.out:
            raise ValueError("--resume needs --out RUN_DIR, the run to continue")
        config = read_run_config(Path(args.out)).with_overrides(args.overrides)
    else:
        config = _run_configuration(args)
    out = Path(args.out or Path("runs") / (args.preset or "text-small"))
    started = time.perf_counter()
    train(config, out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wall time {time.perf_counter() - started:.0f} s")
    return 0


def cmd_prepare(args) -> int:
    from .data import prepare_text, prepared_meta

    config = _run_configuration(args)
    for item in args.overrides:
        section, field = config.locate(item.partition("=")[0])
        if section != "data" and (section, field) != ("model", "length"):
            raise ValueError(f"{section}.{field}: pgm prepare reads the data settings and the row length (length=N), "
                             "nothing else")
    if config.data.is_image:
        raise ValueError("pgm prepare prepares text; image data is encoded by the run that trains on it")
    if config.data.prepared:
        raise ValueError("data.prepared names data to use, not to make: pass --out DATA_DIR instead")
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
    from .runs import CHECKPOINTS, RunError, checkpoint_dirs, consolidate_checkpoint, is_sharded

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
    from .distill import distill, distillation_config
    from .presets import distill_preset
    from .runs import read_run_config

    overrides = list(args.overrides)
    if args.teacher is not None and "=" in args.teacher and not Path(args.teacher).exists():
        overrides.insert(0, args.teacher)  # `pgm distill --resume --out RUN key=value`: no teacher given
        args.teacher = None
    teacher = None
    if args.resume:
        if args.teacher is not None or args.preset:
            raise ValueError("--resume continues the saved distillation; drop the teacher and --preset")
        if not args.out:
            raise ValueError("--resume needs --out RUN_DIR, the distillation to continue")
        if any(item.partition("=")[0].rpartition(".")[2] == "max_steps" for item in overrides):
            raise ValueError("a distillation's length is distill.round_steps x its rounds, fixed when it started")
        config = read_run_config(Path(args.out)).with_overrides(overrides)
        if config.distill is None:
            raise ValueError(f"{args.out} is a training run, not a distillation: continue it with pgm train --resume")
        out = Path(args.out)
    else:
        if args.teacher is None:
            raise ValueError("name the teacher to distil: pgm distill TEACHER --out RUN")
        config, teacher = distillation_config(args.teacher, *distill_preset(args.preset or "distill-small"), overrides)
        out = Path(args.out or Path("runs") / f"{Path(args.teacher).name}-distilled")
    started = time.perf_counter()
    distill(config, out, resume=args.resume, teacher=teacher)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wall time {time.perf_counter() - started:.0f} s")
    return 0


def _request(args) -> dict:
    """The generation arguments given on the command line (the pipeline supplies the defaults)."""
    from .pipeline import GenerationRequest

    return {field.name: getattr(args, field.name) for field in dataclasses.fields(GenerationRequest)
            if hasattr(args, field.name)}


def cmd_sample(args) -> int:
    from .pipeline import load

    pipe = load(args.source, device=args.device, weights=args.weights, precision=args.precision, vq=args.vq,
                gpt2_file=args.gpt2_file, compile=compile_mode(args.compile))
    if pipe.modality == "text" and args.out is not None:
        raise ValueError("--out writes an image grid; text samples are printed")
    samples = pipe.sample(**_request(args))
    if pipe.modality == "image":
        return _print_images(args, pipe, samples)
    for number, text in enumerate(samples.outputs, 1):
        print(f"=== sample {number} ===\n{text}\n")
    rows, length = samples.tokens.shape
    print(f"{rows} x {length} positions, {samples.generated} generated in {samples.steps} steps: "
          f"{samples.seconds:.2f} s ({samples.generated / samples.seconds:.0f} generated tokens/s)", file=sys.stderr)
    return 0


def _print_images(args, pipe, samples) -> int:
    import torch

    from .image_generation import save_grid

    source = Path(args.source)
    out = Path(args.out) if args.out else (source if source.is_dir() else Path(".")) / "samples.png"
    count, copies = len(samples.outputs), samples.settings["num_samples"]
    images = samples.images
    if samples.originals is not None:  # each row of originals (through the VQ) above its completions
        columns = min(count, 10)
        images = torch.cat([torch.cat([samples.originals[i:i + columns], images[i:i + columns]])
                            for i in range(0, count, columns)])
    else:  # one column per class, its samples below each other
        columns = count // copies
        images = images[sorted(range(count), key=lambda i: (i % copies, i // copies))]
    save_grid(images, out, columns=columns)
    names = pipe.class_names
    shown = ", ".join(names[c] if c < len(names) else ("none" if c == pipe.config.num_classes else str(c))
                      for c in dict.fromkeys(samples.labels))
    settings = samples.settings
    print(f"wrote {out}: {count} images ({shown}); {samples.steps} steps of {settings['sampler']}, guidance "
          f"{settings['guidance']:g} ({settings['guidance_schedule']}), {samples.seconds:.2f} s "
          f"({count / samples.seconds:.1f} images/s)")
    return 0


SAMPLE_FLAGS = ("num_samples", "steps", "sampler", "sample_batch_size", "cache_refresh", "cache_growth")
IMAGE_FLAGS = ("guidance", "guidance_schedule", "temperature", "classifier", "reference", "shards", "shard_size",
               "hide_newest", "redraw")


def _eval_flags_in_use(args, modality: str) -> None:
    """Refuse the eval flags that would have no effect on this run, naming what they apply to."""
    measures_samples = (bool(args.evaluator) if modality == "text" else
                        bool(args.fid or args.inception or args.reference is not None))
    applies = {"text": SAMPLE_FLAGS, "image": SAMPLE_FLAGS + IMAGE_FLAGS, "vq": ("classifier",)}[modality]
    for name in SAMPLE_FLAGS + IMAGE_FLAGS:
        value = getattr(args, name)
        if value is not None and value is not False and not (measures_samples and name in applies):
            what = ("the samples of --evaluator (text) or --fid (images)" if name in SAMPLE_FLAGS else
                    "--fid or --inception" if name == "classifier" else "image models evaluated with --fid")
            raise ValueError(f"--{name.replace('_', '-')} has no effect here: it applies to {what}")
    if modality != "text" and args.evaluator:
        raise ValueError("--evaluator scores text samples; image models are evaluated with --fid")
    if modality == "text" and (args.fid or args.inception):
        raise ValueError("--fid and --inception evaluate image models; this is a text model")
    if args.reference is None and (args.shards is not None or args.shard_size is not None):
        raise ValueError("--shards and --shard-size apply to an evaluation against --reference")
    if args.compile != "eager" and not measures_samples:
        raise ValueError("--compile has no effect here: it applies to the samples of --evaluator (text) or --fid "
                         "(images)")


def _given(args, **names) -> dict:
    """{parameter: value} of the flags given on the command line (flag name -> parameter name)."""
    return {parameter: getattr(args, flag) for parameter, flag in names.items() if getattr(args, flag) is not None}


def cmd_eval(args) -> int:
    from .pipeline import load

    from .devices import process_device

    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    pipe = load(args.run_dir, device=process_device(args.device), weights=args.weights, precision=args.precision,
                vq=args.vq, compile=compile_mode(args.compile))
    _eval_flags_in_use(args, pipe.modality)
    card = pipe.model.origin.card
    if rank == 0:
        print(f"{'run' if pipe.run else 'model'} {args.run_dir} ({pipe.config.kind}, {Path(pipe.source).name}, "
              f"{card.get('weights')} weights)")
    passes = args.passes if args.passes is not None else (4 if pipe.run else 0)
    if passes != 0:  # 0 skips it; a negative number is refused
        _print_validation(pipe, pipe.validation(passes=passes, rows=args.rows, batch_size=args.batch_size,
                                                seed=args.seed))
    sampling = _given(args, num_samples="num_samples", steps="steps", sampler="sampler", batch_size="sample_batch_size",
                      cache_refresh="cache_refresh", cache_growth="cache_growth")
    if pipe.modality == "vq":
        scores = pipe.reconstruction(fid=args.fid, inception=args.inception, **_given(args, classifier="classifier"))
        print(f"codebook: {100 * scores['usage']:.1f}% of {scores['codebook_size']} codes used on the validation "
              f"images, code perplexity {scores['code_perplexity']:.1f}")
        if "fd" in scores:
            print(f"{scores['metric']} of the reconstructions of the {scores['images']} validation images: "
                  f"{scores['fd']:.3f}")
    elif pipe.modality == "image" and args.reference is not None:
        scores = pipe.fid(args.reference, inception=args.inception, seed=args.seed, rank=rank, world_size=world_size,
                          hide_newest=args.hide_newest, redraw=args.redraw,
                          **_given(args, classifier="classifier", guidance="guidance", num_samples="num_samples",
                                   guidance_schedule="guidance_schedule", temperature="temperature", steps="steps",
                                   sampler="sampler", batch_size="sample_batch_size", shard_size="shard_size",
                                   shards="shards"))
        if scores is not None:
            print(f"{scores['metric']} {scores['fid']:.3f}, IS {scores['is'][0]:.2f}: {scores['num_samples']} samples "
                  f"({scores['steps']} steps, {scores['sampler']}, guidance {scores['guidance']:g} "
                  f"({scores['guidance_schedule']}), temperature {scores['temperature']:g}"
                  f"{', hide-newest' if scores['hide_newest'] else ''}{', redraw' if scores['redraw'] else ''}) "
                  f"vs {args.reference}; shards in {scores['shards']}")
    elif pipe.modality == "image" and (args.fid or args.inception):
        if args.hide_newest or args.redraw:
            raise ValueError("--hide-newest and --redraw reproduce the released models' FIDs against --reference")
        scores = pipe.image_quality(inception=args.inception, seed=args.seed, **sampling,
                                    **_given(args, classifier="classifier", guidance="guidance",
                                             guidance_schedule="guidance_schedule", temperature="temperature"))
        metric = scores["metric"]
        print(f"{metric} {scores['fd']:.3f}, IS {scores['is']:.2f}: {scores['num_samples']} samples "
              f"({scores['steps']} steps, {scores['sampler']}, guidance {scores['guidance']:g}, temperature "
              f"{scores['temperature']:g}) vs {scores['real_images']} real validation images; sampling "
              f"{scores['images_per_s']:.1f} images/s")
        print(f"VQ floor: {metric} {scores['vq_floor_fd']:.3f}, IS {scores['vq_floor_is']:.2f} for the VQ "
              "reconstructions of the same validation images")
    elif pipe.modality == "text" and args.evaluator:
        generated = pipe.generative_perplexity(args.evaluator, seed=args.seed, **sampling)
        print(f"generative perplexity {generated.perplexity:.2f} under {args.evaluator} ({generated.num_samples} "
              f"samples, {generated.steps} steps, {generated.evaluator_tokens} evaluator tokens; NLL "
              f"{generated.nll:.4f} +- {generated.nll_stderr:.4f} nats/token)")
        print(f"sample entropy {generated.entropy:.3f} nats; sampling {generated.tokens_per_s:.0f} generated tokens/s")
    return 0


def _print_validation(pipe, result) -> None:
    from .eval.images import psnr
    from .runs import validation_metric

    kind = pipe.config.kind
    if kind == "vq":
        print(f"validation: {result.tokens // pipe.config.length} images; MSE {result.nll:.5f} per pixel on [-1, 1], "
              f"PSNR {psnr(result.nll):.2f} dB")
    elif pipe.modality == "image":
        spread = f" +- {result.stderr:.4f}" if result.passes > 1 else ""
        name, unit = validation_metric(pipe.config)
        print(f"validation: {result.tokens} codes x {result.passes} passes; {name} {result.nll:.4f}{spread} {unit}")
    elif kind == "ar":
        print(f"validation: {result.tokens} tokens (exact likelihood)")
        print(f"NLL        {result.nll:.4f} nats/token")
        print(f"perplexity {result.perplexity:.2f}")
    else:
        print(f"validation: {result.tokens} tokens x {result.passes} Monte-Carlo passes")
        print(f"ELBO       {result.nll:.4f} +- {result.stderr:.4f} nats/token")
        print(f"perplexity {result.perplexity:.2f} +- {result.perplexity_stderr:.2f}  "
              "(an upper bound: exp of the ELBO)")
    if pipe.modality == "text":
        print(f"unigram perplexity of the corpus: {math.exp(pipe.data.meta['unigram_val_nll']):.2f}")


def cmd_fid_classifier(args) -> int:
    from .data.images import fit_size, load_fashion_mnist
    from .eval.fid import train_classifier

    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    model, accuracy = train_classifier(fit_size(train_images, 32), train_labels, fit_size(test_images, 32),
                                       test_labels, epochs=args.epochs, seed=args.seed)
    out = Path(args.out)
    model.save_pretrained(out)
    print(f"wrote {out}: test accuracy {100 * accuracy:.2f}% on the {len(test_images):,} Fashion-MNIST test images "
          f"({len(train_images):,} trained on); its features give `pgm eval RUN --fid` its FD (classifier "
          "features), which is not comparable to Inception FID")
    return 0


def cmd_report(args) -> int:
    from . import report as reports

    out_dir = Path(args.out)
    distillations = [reports.is_distillation(Path(item)) for item in args.runs]
    evaluator = args.evaluator
    if any(distillations):
        if not all(distillations):
            raise ValueError("a report compares either distillations (their rounds) or trained runs, not both")
        if args.tokens is not None or args.passes is not None or args.cache_refresh or args.cache_growth:
            raise ValueError("--tokens, --passes, --cache-refresh and --cache-growth apply to trained runs; a "
                             "distillation report measures samples")
    if not evaluator.startswith("hf:"):
        evaluator = str(reports.ensure_run(evaluator, out_dir, args.tokens))
    if any(distillations):
        report = reports.build_distill_report([Path(item) for item in args.runs], evaluator,
                                              steps_list=args.steps or reports.DISTILL_STEPS,
                                              num_samples=args.num_samples, batch_size=args.batch_size,
                                              seed=args.seed, device=args.device)
        path = reports.write_report(report, out_dir, reports.format_distill_markdown, reports.plot_distillation)
    else:
        runs = [reports.ensure_run(item, out_dir, args.tokens) for item in args.runs]
        report = reports.build_report(runs, evaluator, steps_list=args.steps or reports.STEPS,
                                      num_samples=args.num_samples, batch_size=args.batch_size,
                                      passes=4 if args.passes is None else args.passes, seed=args.seed,
                                      cache_refreshes=args.cache_refresh or (), cache_growths=args.cache_growth or (),
                                      device=args.device)
        path = reports.write_report(report, out_dir)
    print(path.read_text().split("\n![")[0].rstrip())
    print(f"wrote {path}")
    return 0


def cmd_convert(args) -> int:
    import json

    from .pipeline import convert

    out, tokenizer = convert(args.checkpoint, args.out_dir, weights=args.weights, gpt2_file=args.gpt2_file,
                             vq=args.vq, vq_reference=args.vq_reference,
                             **_given(args, pre_query_mode="pre_query_mode", length="length",
                                      mask_token_id="mask_id", num_heads="num_heads", image_size="image_size"))
    model = json.loads((out / "config.json").read_text())["model"]
    print(f"wrote {out}: a {model['kind']} model, {(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB of "
          f"weights, {tokenizer}")
    return 0


def cmd_serve(args) -> int:
    from .pipeline import load
    from .serve import serve
    from .serve.app import run_names

    for name, value in (("--max-samples", args.max_samples), ("--capacity", args.capacity)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must lie in [0, 65535], got {args.port}")
    pipelines = {}
    for name, source in zip(run_names(args.sources), args.sources):
        pipelines[name] = load(source, device=args.device, weights=args.weights, precision=args.precision,
                               compile=compile_mode(args.compile))
        print(f"loaded {name}: {pipelines[name]!r}", file=sys.stderr)
    serve(pipelines, host=args.host, port=args.port, max_samples=args.max_samples, capacity=args.capacity,
          log=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


def cmd_harness(args) -> int:
    from .harness import evaluate
    from lm_eval.utils import make_table

    results, path = evaluate(args.source, args.tasks, num_mc=args.num_mc, limit=args.limit, method=args.method,
                             batch_size=args.batch_size, seed=args.seed, num_fewshot=args.num_fewshot,
                             include=args.include, output=args.output, device=args.device, weights=args.weights,
                             precision=args.precision, gpt2_file=args.gpt2_file, bootstrap_iters=args.bootstrap_iters)
    settings = results["pgm"]
    how = ("exact" if settings["kind"] == "ar" else
           f"{settings['method']}, {settings['num_mc']} Monte-Carlo samples each")
    print(f"{settings['source']} ({settings['kind']}, {settings['weights']} weights, {settings['dtype']}): "
          f"log-likelihoods {how}")
    print(make_table(results))
    for task, value in settings["loglikelihood"].items():
        spread = "" if settings["kind"] == "ar" else f" +- {value['stderr']:.4f}"
        print(f"{task}: log-likelihood {value['per_token']:.4f}{spread} nats per scored token "
              f"({value['tokens']} tokens)")
    print(f"wrote {path}")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    if args.presets is not None and args.what == "sampling":
        raise ValueError("--presets chooses the models of bench training and bench images; bench sampling builds "
                         "its models from --hidden, --heads and the block counts")
    if args.sampler is not None and args.what != "images":
        raise ValueError("--sampler applies to bench images")
    if (args.cache_refresh or args.cache_growth) and (args.what != "sampling" or "pgm-cache" not in args.models):
        raise ValueError("--cache-refresh and --cache-growth apply to the pgm-cache model of bench sampling "
                         "(--models ... pgm-cache)")
    out_dir = Path(args.out_dir)
    if args.attention is not None and args.what != "training":
        raise ValueError("--attention applies to bench training")
    if args.compile is not None and args.what != "sampling":
        raise ValueError("--compile applies to bench sampling")
    if args.shape is not None and args.what != "images":
        raise ValueError("--shape applies to bench images")
    names = (args.presets or []) + (args.shape or [])
    common = dict(repeats=args.repeats, device=args.device, **({"presets": names} if names else {}),
                  **_given(args, warmup="warmup"))
    if args.what == "images":
        report = bench.bench_images(**common,
                                    **_given(args, steps_list="steps", batch="batch_size", sampler="sampler"))
        print(bench.format_images_table(report))
        path = bench.write_report(report, out_dir, "images")
    elif args.what == "sampling":
        shape = bench.Shape(hidden=args.hidden, heads=args.heads, pgm_encoder=args.pgm_blocks[0],
                            pgm_decoder=args.pgm_blocks[1], baseline_blocks=args.baseline_blocks, vocab=args.vocab)
        report = bench.bench_sampling(lengths=args.lengths or [256], shape=shape,
                                      models=args.models, compiles=[compile_mode(m) for m in args.compile or ["eager"]],
                                      **common, **_given(args, steps_list="steps", batch="batch_size",
                                                         cache_refreshes="cache_refresh", cache_growths="cache_growth"))
        print(bench.format_sampling_table(report))
        path = bench.write_report(report, out_dir, "sampling")
        bench.plot_sampling(report, out_dir / "sampling.png")
    else:
        if args.lengths is not None and len(args.lengths) != 1:
            raise ValueError("bench training takes one --lengths value, the length of every model")
        common["steps"] = common.pop("repeats")
        report = bench.bench_training(length=args.lengths[0] if args.lengths else None,
                                      **common, **_given(args, batch_size="batch_size", attentions="attention"))
        print(bench.format_training_table(report))
        path = bench.write_report(report, out_dir, "training")
    print(f"wrote {path}")
    return 0


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per argument of `pgm.pipeline.GenerationRequest`, named after it, with its help.
    Flags not given are left out, so the pipeline's defaults are the command line's."""
    from .pipeline import GenerationRequest

    for field in dataclasses.fields(GenerationRequest):
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=argparse.SUPPRESS,
                            help=field.metadata["help"], **field.metadata["cli"])


def add_loading_options(parser: argparse.ArgumentParser, precision_note: str = "", samples: bool = True) -> None:
    """The options of every command that loads a model to run it: which weights, where, how precise,
    and (`samples`: for a command that samples) whether the sampling network is compiled."""
    parser.add_argument("--weights", choices=("ema", "raw"), help="a run's average or raw weights (default: the "
                                                                   "average where there is one)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: bf16 autocast on a GPU, float32 on a CPU" + precision_note)
    if samples:
        parser.add_argument("--compile", choices=COMPILE_CHOICES, default="eager", metavar="MODE",
                            help="sample through torch.compile: eager (the default) or a mode, "
                                 f"{', '.join(COMPILE_MODES)} (PGM, MDLM, MaskGIT; the first samples compile)")


def build_parser() -> argparse.ArgumentParser:
    from .sampling.pgm import refresh_interval

    parser = argparse.ArgumentParser(prog="pgm", description="Partition Generative Models and their baselines.")
    parser.add_argument("--version", action="version", version=f"partition-gm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

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

    sample = commands.add_parser("sample", help="generate text or images from a run, a pretrained directory or a "
                                                "checkpoint")
    sample.add_argument("source", help="a run or pretrained directory, an authors' checkpoint, or a Hub id")
    add_request_arguments(sample)
    sample.add_argument("--out", help="images: the PNG grid to write (default SOURCE/samples.png)")
    add_loading_options(sample)
    sample.add_argument("--vq", help="images: the VQ tokenizer to decode with (a VQ run or pretrained directory, or "
                                     "LlamaGen's vq_ds8_c2i.pt), instead of the model's own")
    sample.add_argument("--gpt2-file", help="a local gpt2.tiktoken, for checkpoints that name GPT-2's tokenizer")
    sample.set_defaults(handler=cmd_sample)

    evaluate = commands.add_parser("eval", help="validation perplexity of a trained run, sample quality")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--passes", type=int, help="Monte-Carlo passes over the validation rows (default 4 on a run, "
                                                     "0 (skip) on a pretrained directory; AR is exact in one)")
    evaluate.add_argument("--rows", type=int, default=0, help="score only the first N validation rows (0: all)")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--seed", type=int, default=0)
    add_loading_options(evaluate, precision_note=" (the authors' MaskGIT ran in fp32)")
    evaluate.add_argument("--vq", help="images: the VQ tokenizer to decode with, instead of the model's own")
    evaluate.add_argument("--evaluator", help="text: also the generative perplexity of samples, scored by an AR run "
                                              "(a directory) or a Hugging Face causal LM (hf:gpt2-large)")
    evaluate.add_argument("--num-samples", type=int,
                          help="samples to draw: text (--evaluator) default 64, images (--fid) default 1000")
    evaluate.add_argument("--steps", type=int, help="decoding steps of the samples (default: text min(L-1, 128), "
                                                    "images 32)")
    evaluate.add_argument("--sampler", help="the samples' sampler (as in pgm sample)")
    evaluate.add_argument("--sample-batch-size", type=int, help="samples drawn at a time (default 32)")
    evaluate.add_argument("--cache-refresh", type=refresh_interval, metavar="N",
                          help="PGM samples: the encoder cache, re-encoding every N steps or never (as in pgm sample)")
    evaluate.add_argument("--cache-growth", type=float, help="with --cache-refresh: also re-encode when the clean set "
                                                               "has grown by this fraction")
    evaluate.add_argument("--fid", action="store_true",
                          help="images: FD and IS under the in-repo classifier's features (not Inception FID)")
    evaluate.add_argument("--classifier", help="images: the feature classifier (default runs/fid-classifier, "
                                               "where pgm fid-classifier writes it)")
    evaluate.add_argument("--inception", metavar="WEIGHTS",
                          help="images: the standard FID instead, with torch-fidelity's Inception-v3 weights from this "
                               "local file (pip install torch-fidelity)")
    evaluate.add_argument("--reference", help="images: FID against this reference, a folder of images (class "
                                              "sub-folders give the labels to sample) or an .npz of statistics "
                                              "(mu, sigma): the ImageNet protocol, in resumable shards")
    evaluate.add_argument("--shards", help="images, --reference: where the shards go (default fid-shards/KEY beside "
                                           "the model)")
    evaluate.add_argument("--shard-size", type=int, help="images, --reference: images per shard (default 1000)")
    evaluate.add_argument("--hide-newest", action="store_true", help="images, --reference: the released image "
                                                                     "PGM's inference (see pgm sample --help)")
    evaluate.add_argument("--redraw", action="store_true", help="images, --reference: the PGM paper's MaskGIT "
                                                                "sampler (see pgm sample --help)")
    evaluate.add_argument("--guidance", type=float, help="images: classifier-free guidance weight (default 0)")
    evaluate.add_argument("--guidance-schedule", choices=("linear", "constant"), help="images: default linear")
    evaluate.add_argument("--temperature", type=float, help="images: sampling temperature (default 1)")
    evaluate.set_defaults(handler=cmd_eval)

    report = commands.add_parser("report", help="PGM vs MDLM vs AR: perplexities, sample quality and speed; or "
                                                "distillations, round by round")
    report.add_argument("runs", nargs="+", metavar="RUN", help="run directories, or presets to train first; or "
                                                                "distillation runs (pgm distill)")
    report.add_argument("--evaluator", required=True,
                        help="an AR run directory or preset, or hf:NAME (the paper: hf:gpt2-large)")
    report.add_argument("--out", default="reports/latest", help="where report.md, report.json and plots go")
    report.add_argument("--steps", type=int, nargs="+", help="sampling steps (default 16 32 64 128 256; "
                                                            "distillations: 8 16 32 64 128)")
    report.add_argument("--num-samples", type=int, default=64)
    report.add_argument("--batch-size", type=int, default=32, help="samples drawn at a time")
    report.add_argument("--passes", type=int, help="Monte-Carlo passes of the validation ELBO (default 4)")
    report.add_argument("--tokens", type=int, help="training budget in tokens for presets (default: the preset's)")
    report.add_argument("--cache-refresh", type=refresh_interval, nargs="+", metavar="N",
                        help="PGM runs: also sample with the encoder cache at each refresh interval (e.g. 1 2 4 never)")
    report.add_argument("--cache-growth", type=float, nargs="+", metavar="F",
                        help="PGM runs: also sample with the encoder cache refreshed only when the clean set has grown "
                             "by F since the last refresh")
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--device", default="cpu")
    report.set_defaults(handler=cmd_report)

    classifier = commands.add_parser("fid-classifier", help="train the Fashion-MNIST classifier whose features "
                                                              "pgm eval --fid uses")
    classifier.add_argument("--out", default="runs/fid-classifier")
    classifier.add_argument("--epochs", type=int, default=2)
    classifier.add_argument("--seed", type=int, default=0)
    classifier.set_defaults(handler=cmd_fid_classifier)

    convert = commands.add_parser("convert", help="import released checkpoints (the authors' text and image "
                                                  "models, LlamaGen's VQ) into our format")
    convert.add_argument("source", choices=("official",), help="official: a released file; which one it is (text, "
                                                               "image PGM, MaskGIT, VQ) is read from its content")
    convert.add_argument("checkpoint")
    convert.add_argument("out_dir")
    convert.add_argument("--weights", choices=("ema", "raw"),
                         help="text: the EMA average (default, when the file has one) or the raw weights")
    convert.add_argument("--gpt2-file", help="text: a local gpt2.tiktoken to store with the model (offline use)")
    convert.add_argument("--vq", help="images: the VQ tokenizer to keep with the model (LlamaGen's vq_ds8_c2i.pt "
                                      "or a converted VQ directory)")
    convert.add_argument("--vq-reference", action="store_true",
                         help="images: name the --vq file in tokenizer/ instead of copying its weights")
    convert.add_argument("--pre-query-mode", choices=("learn", "learn+freqs", "learn+freqs+mean",
                                                       "learn+freqs+logsumexp"),
                         help="override GroupSwap's mode (not visible in the weights; default from the checkpoint)")
    convert.add_argument("--length", type=int, help="override the model length (text: default from the checkpoint; "
                                                    "image PGM: 1025, the BOS and 32 x 32 codes)")
    convert.add_argument("--mask-id", type=int, help="text: override the mask token id (default from the tokenizer)")
    convert.add_argument("--num-heads", type=int, help="the heads, which the weights do not show where there is no "
                                                       "rotary_emb.inv_freq (images: default 16, the released models')")
    convert.add_argument("--image-size", type=int, help="VQ: the image size it reads (default 256, VQ-8's)")
    convert.set_defaults(handler=cmd_convert)

    serve = commands.add_parser("serve", help="a local web page (and JSON API) that streams generation, and races "
                                              "two runs")
    serve.add_argument("sources", nargs="+", metavar="RUN", help="runs, pretrained directories or checkpoints to "
                                                                 "serve (text or image models)")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="the port (0: a free one)")
    add_loading_options(serve)
    serve.add_argument("--max-samples", type=int, default=16, help="the most samples one request may ask for")
    serve.add_argument("--capacity", type=int, default=16, help="requests held at once; more are answered 503")
    serve.set_defaults(handler=cmd_serve)

    harness = commands.add_parser("harness", help="downstream tasks through EleutherAI's lm-evaluation-harness "
                                                  "(pip install 'partition-gm[harness]')")
    harness.add_argument("source", metavar="RUN", help="a text run, a pretrained directory or the authors' checkpoint")
    harness.add_argument("--tasks", nargs="+", required=True,
                         help="harness task names: pgm_lambada and pgm_cloze are built offline from the built-in "
                              "corpus's validation split; others come from the harness (the Hub) or --include")
    harness.add_argument("--num-mc", type=int, default=128, help="Monte-Carlo samples per log-likelihood (PGM, "
                                                                 "MDLM; AR is exact)")
    harness.add_argument("--limit", type=int, help="score only the first K examples of each task")
    harness.add_argument("--method", default="conditional",  # checked by the harness model, with its choices
                         help="conditional: the continuation given the clean context (default); whole-sequence: the "
                              "ELBO of context and continuation together, as the authors' adapter")
    harness.add_argument("--num-fewshot", type=int, help="examples in each prompt (default: the task's)")
    harness.add_argument("--batch-size", type=int, default=64, help="rows per model call")
    harness.add_argument("--seed", type=int, default=0)
    harness.add_argument("--bootstrap-iters", type=int, default=1000,
                         help="resamples for the standard errors of the harness's metrics (0: none)")
    harness.add_argument("--include", nargs="+", default=[], metavar="FOLDER",
                         help="folders of your own YAML task files")
    harness.add_argument("--output", help="the results JSON (default: RUN/harness/TASKS-METHOD-mcN.json)")
    add_loading_options(harness, samples=False)
    harness.add_argument("--gpt2-file", help="a local gpt2.tiktoken, for checkpoints that name GPT-2's tokenizer")
    harness.set_defaults(handler=cmd_harness)

    bench = commands.add_parser("bench", help="speed of sampling or training, models side by side")
    bench.add_argument("what", choices=("sampling", "training", "images"))
    bench.add_argument("--lengths", type=int, nargs="+", help="sampling: sequence lengths (default 256); training: "
                                                               "one length for every model (default: each model's)")
    bench.add_argument("--steps", type=int, nargs="+", help="sampling: step counts (default 64); images: 32")
    bench.add_argument("--batch-size", type=int, help="sampling: default 8; images: 32 (batch 1 is timed too); "
                                                      "training: default the preset's, 8 for the paper's shapes")
    bench.add_argument("--sampler", choices=("halton", "confidence"), help="images: the sampler (default halton)")
    bench.add_argument("--attention", nargs="+", choices=("dense", "grouped", "jagged"),
                       help="training: a PGM row for each way its training attention runs (default: dense grouped; "
                            "jagged is for a GPU, slow on a CPU)")
    bench.add_argument("--models", nargs="+", default=["pgm", "mdlm", "mdlm-full", "ar"],
                       choices=("pgm", "pgm-cache", "mdlm", "mdlm-full", "ar"),
                       help="mdlm: logits only where tokens are revealed; mdlm-full: logits everywhere; pgm-cache: "
                            "PGM with its encoder cache")
    bench.add_argument("--cache-refresh", type=refresh_interval, nargs="+", metavar="N",
                       help="sampling, pgm-cache: re-encode the clean set every N steps, or never (the default "
                            "without --cache-growth); several: a pgm-cache row for each")
    bench.add_argument("--cache-growth", type=float, nargs="+", metavar="F",
                       help="sampling, pgm-cache: a row for each F that re-encodes only when the clean set has grown "
                            "by F since the last refresh")
    bench.add_argument("--compile", nargs="+", choices=COMPILE_CHOICES, metavar="MODE",
                       help="sampling: a pgm, mdlm and mdlm-full row for each: eager, or a torch.compile mode ("
                            f"{', '.join(COMPILE_MODES)}; default: eager)")
    bench.add_argument("--hidden", type=int, default=256)
    bench.add_argument("--heads", type=int, default=4)
    bench.add_argument("--pgm-blocks", type=int, nargs=2, default=[4, 4], metavar=("ENCODER", "DECODER"))
    bench.add_argument("--baseline-blocks", type=int, default=8)
    bench.add_argument("--vocab", type=int, default=50258)
    bench.add_argument("--presets", nargs="+", help="training and images: the presets to compare (default: "
                       "text-small mdlm-small ar-small; images: fmnist-pgm fmnist-maskgit); training also takes "
                       "the paper's OpenWebText shapes pgm-owt-8-8, pgm-owt-6-6-1024, mdlm-owt (random weights)")
    bench.add_argument("--shape", nargs="+", choices=tuple(IMAGE_SHAPES),
                       help="images: the released ImageNet models' shapes (494M / 480M parameters), random weights")
    bench.add_argument("--repeats", type=int, default=3, help="timed repetitions (training: training-loss passes)")
    bench.add_argument("--warmup", type=int, help="untimed runs before the timed ones (default 1; training: 2 "
                                                  "passes)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--out-dir", default="benchmarks/results")
    bench.set_defaults(handler=cmd_bench)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args`, except that a key=value after an option (pgm distill TEACHER --out RUN
    key=value), which argparse leaves over once the positionals are taken, is a setting too."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, argv)
    if args.command is None:
        parser.print_help()
        return 0
    keep_freed_memory()
    try:
        return args.handler(args)
    except (ValueError, OSError, ImportError) as error:
        if os.environ.get("PGM_DEBUG"):
            raise
        message = str(error).strip() or type(error).__name__
        print(f"pgm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pgm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
