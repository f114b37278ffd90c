"""`pgm eval` (validation perplexity, and the quality of samples drawn with the sampler settings'
flags) and `pgm fid-classifier` (the feature classifier of `pgm eval --fid`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import ArgumentError
from ..formats import check_writable
from ..sampling.compiled import compile_mode
from ..sampling.settings import add_arguments, given_settings
from .common import add_loading_options, given

IMAGE_FLAGS = ("classifier", "reference", "shards", "shard_size")


def register(commands) -> None:
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
    evaluate.add_argument("--sample-batch-size", type=int, help="samples drawn at a time (default 32)")
    add_arguments(evaluate)  # how the samples are drawn, as in pgm sample
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
    evaluate.set_defaults(handler=cmd_eval)

    classifier = commands.add_parser("fid-classifier", help="train the Fashion-MNIST classifier whose features "
                                                              "pgm eval --fid uses")
    classifier.add_argument("--out", default="runs/fid-classifier")
    classifier.add_argument("--epochs", type=int, default=2)
    classifier.add_argument("--seed", type=int, default=0)
    classifier.set_defaults(handler=cmd_fid_classifier)


def _flags_in_use(args, modality: str) -> None:
    """Refuse the eval flags that would have no effect on this run, naming what they apply to."""
    measures_samples = (bool(args.evaluator) if modality == "text" else
                        bool(args.fid or args.inception or args.reference is not None))
    sampling = {**given(args, num_samples="num_samples", sample_batch_size="sample_batch_size"), **given_settings(args)}
    if sampling and not measures_samples:
        raise ArgumentError(f"--{next(iter(sampling)).replace('_', '-')} has no effect here: it applies to the samples "
                            "of --evaluator (text) or --fid (images)")
    for name in IMAGE_FLAGS:
        if getattr(args, name) is not None and not (modality == "image" and measures_samples or
                                                    modality == "vq" and name == "classifier"):
            what = "--fid or --inception" if name == "classifier" else "image models evaluated with --fid"
            raise ArgumentError(f"--{name.replace('_', '-')} has no effect here: it applies to {what}")
    if modality != "text" and args.evaluator:
        raise ArgumentError("--evaluator scores text samples; image models are evaluated with --fid")
    if modality == "text" and (args.fid or args.inception):
        raise ArgumentError("--fid and --inception evaluate image models; this is a text model")
    if args.reference is None and (args.shards is not None or args.shard_size is not None):
        raise ArgumentError("--shards and --shard-size apply to an evaluation against --reference")
    if args.compile != "eager" and not measures_samples:
        raise ArgumentError("--compile has no effect here: it applies to the samples of --evaluator (text) or --fid "
                            "(images)")
    from ..pipeline.request import positive

    for name in ("num_samples", "sample_batch_size", "shard_size"):  # all before the validation pass
        if getattr(args, name) is not None:
            positive(name, getattr(args, name))
    for name in ("evaluator", "reference", "inception"):  # local files
        path = getattr(args, name)
        if path is not None and not str(path).startswith("hf:") and not Path(path).exists():
            raise ArgumentError(f"--{name} {path} does not exist")


def cmd_eval(args) -> int:
    from ..devices import process_device
    from ..pipeline import load

    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    pipe = load(args.run_dir, device=process_device(args.device), weights=args.weights, precision=args.precision,
                vq=args.vq, compile=compile_mode(args.compile))
    _flags_in_use(args, pipe.modality)
    card = pipe.model.origin.card
    if rank == 0:
        print(f"{'run' if pipe.run else 'model'} {args.run_dir} ({pipe.config.kind}, {Path(pipe.source).name}, "
              f"{card.get('weights')} weights)")
    if args.passes == 0 and not (args.evaluator or args.fid or args.inception or args.reference is not None
                                 or pipe.modality == "vq"):
        raise ArgumentError("--passes 0 skips the validation, and nothing else was asked (--evaluator for text, --fid "
                            "or --reference for images)")
    if args.passes != 0 and (pipe.run or args.passes is not None):  # 0 skips it; a negative number is refused
        _print_validation(pipe, pipe.validation(passes=args.passes, rows=args.rows, batch_size=args.batch_size,
                                                seed=args.seed))
    sampling = {**given(args, num_samples="num_samples", batch_size="sample_batch_size"), **given_settings(args)}
    if pipe.modality == "vq":
        _print_reconstruction(pipe.reconstruction(fid=args.fid, inception=args.inception,
                                                  **given(args, classifier="classifier")))
    elif pipe.modality == "image" and args.reference is not None:
        scores = pipe.fid(args.reference, inception=args.inception, seed=args.seed, rank=rank, world_size=world_size,
                          **sampling, **given(args, classifier="classifier", shard_size="shard_size", shards="shards"))
        if scores is not None:
            print(f"{scores['metric']} {scores['fid']:.3f}, IS {scores['is'][0]:.2f}: {scores['num_samples']} samples "
                  f"({scores['steps']} steps, {scores['sampler']}, guidance {scores['guidance']:g} "
                  f"({scores['guidance_schedule']}), temperature {scores['temperature']:g}"
                  f"{', hide-newest' if scores['hide_newest'] else ''}{', redraw' if scores['redraw'] else ''}) "
                  f"vs {args.reference}; shards in {scores['shards']}")
    elif pipe.modality == "image" and (args.fid or args.inception):
        _print_image_quality(pipe.image_quality(inception=args.inception, seed=args.seed, **sampling,
                                                **given(args, classifier="classifier")))
    elif pipe.modality == "text" and args.evaluator:
        generated = pipe.generative_perplexity(args.evaluator, seed=args.seed, **sampling)
        print(f"generative perplexity {generated.perplexity:.2f} under {args.evaluator} ({generated.num_samples} "
              f"samples, {generated.steps} steps, {generated.evaluator_tokens} evaluator tokens; NLL "
              f"{generated.nll:.4f} +- {generated.nll_stderr:.4f} nats/token)")
        print(f"sample entropy {generated.entropy:.3f} nats; sampling {generated.tokens_per_s:.0f} generated tokens/s")
    return 0


def _print_validation(pipe, result) -> None:
    from ..eval.image_metrics import psnr
    from ..runs import validation_metric

    kind = pipe.config.kind
    pairs = pipe.modality == "text" and pipe.run_config.data.format == "pairs"
    scored = "response tokens (each pair's prompt given)" if pairs else "tokens"
    if kind == "vq":
        print(f"validation: {result.tokens // pipe.config.length} images; MSE {result.nll:.5f} per pixel on [-1, 1], "
              f"PSNR {psnr(result.nll):.2f} dB")
    elif pipe.modality == "image":
        spread = f" +- {result.stderr:.4f}" if result.passes > 1 else ""
        name, unit = validation_metric(pipe.config)
        print(f"validation: {result.tokens} codes x {result.passes} passes; {name} {result.nll:.4f}{spread} {unit}")
    elif kind == "ar":
        print(f"validation: {result.tokens} {scored} (exact likelihood)")
        print(f"NLL        {result.nll:.4f} nats/token")
        print(f"perplexity {result.perplexity:.2f}")
    else:
        print(f"validation: {result.tokens} {scored} x {result.passes} Monte-Carlo passes")
        if result.passes > 1:
            print(f"ELBO       {result.nll:.4f} +- {result.stderr:.4f} nats/token")
            print(f"perplexity {result.perplexity:.2f} +- {result.perplexity_stderr:.2f}  "
                  "(an upper bound: exp of the ELBO)")
        else:  # one draw has no spread to measure
            print(f"ELBO       {result.nll:.4f} nats/token (one pass: no error estimate; --passes 2 or more gives one)")
            print(f"perplexity {result.perplexity:.2f}  (an upper bound: exp of the ELBO)")
    if pipe.modality == "text":
        print(f"unigram perplexity of the {'responses' if pairs else 'corpus'}: "
              f"{math.exp(pipe.data.meta['unigram_val_nll']):.2f}")


def _print_reconstruction(scores: dict) -> None:
    print(f"codebook: {100 * scores['usage']:.1f}% of {scores['codebook_size']} codes used on the validation "
          f"images, code perplexity {scores['code_perplexity']:.1f}")
    if "fd" in scores:
        print(f"{scores['metric']} of the reconstructions of the {scores['images']} validation images: "
              f"{scores['fd']:.3f}")


def _print_image_quality(scores: dict) -> None:
    metric = scores["metric"]
    print(f"{metric} {scores['fd']:.3f}, IS {scores['is']:.2f}: {scores['num_samples']} samples "
          f"({scores['steps']} steps, {scores['sampler']}, guidance {scores['guidance']:g}, temperature "
          f"{scores['temperature']:g}) vs {scores['real_images']} real validation images; sampling "
          f"{scores['images_per_s']:.1f} images/s")
    print(f"VQ floor: {metric} {scores['vq_floor_fd']:.3f}, IS {scores['vq_floor_is']:.2f} for the VQ "
          "reconstructions of the same validation images")


def cmd_fid_classifier(args) -> int:
    from ..data.image_sets import fit_size, load_fashion_mnist
    from ..eval.fid import train_classifier

    check_writable(args.out)
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
