"""`pgm sample`: text or images from a run, a pretrained directory or a checkpoint. Its flags are
the request's inputs (`GenerationRequest`) and the sampler settings (`SamplerSettings`), with their
names, help texts and defaults."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ArgumentError
from ..formats import check_writable
from ..sampling.compiled import compile_mode
from ..sampling.settings import add_arguments, given_settings
from .common import add_loading_options

def register(commands) -> None:
    sample = commands.add_parser("sample", help="generate text or images from a run, a pretrained directory or a "
                                                "checkpoint")
    sample.add_argument("source", help="a run or pretrained directory, an authors' checkpoint, or a Hub id")
    add_request_arguments(sample)
    add_arguments(sample)
    sample.add_argument("--out", help="images: the PNG grid to write (default SOURCE/samples.png)")
    add_loading_options(sample)
    sample.add_argument("--vq", help="images: the VQ tokenizer to decode with (a VQ run or pretrained directory, or "
                                     "LlamaGen's vq_ds8_c2i.pt), instead of the model's own")
    sample.add_argument("--gpt2-file", help="a local gpt2.tiktoken, for checkpoints that name GPT-2's tokenizer")
    sample.set_defaults(handler=cmd_sample)


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per input of `pgm.pipeline.GenerationRequest`, named after it, with its help. Flags
    not given are left out, so the pipeline's defaults are the command line's."""
    from ..pipeline import GenerationRequest

    for field in GenerationRequest.inputs():
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=argparse.SUPPRESS,
                            help=field.metadata["help"], **field.metadata["cli"])


def request_arguments(args) -> dict:
    """The generation arguments given on the command line (the pipeline supplies the defaults)."""
    from ..pipeline import GenerationRequest

    inputs = {field.name: getattr(args, field.name) for field in GenerationRequest.inputs()
              if hasattr(args, field.name)}
    return {**inputs, **given_settings(args)}


def cmd_sample(args) -> int:
    from ..pictures import image_format
    from ..pipeline import load

    pipe = load(args.source, device=args.device, weights=args.weights, precision=args.precision, vq=args.vq,
                gpt2_file=args.gpt2_file, compile=compile_mode(args.compile))
    if pipe.modality == "text" and args.out is not None:
        raise ArgumentError("--out writes an image grid; text samples are printed")
    if args.out is not None:
        image_format(args.out)  # a name that says no format, or a place not writable, is refused before sampling
        check_writable(Path(args.out).parent)
    arguments = request_arguments(args)
    if pipe.modality == "image":
        return _print_images(args, pipe, pipe.sample(**arguments))
    rows, length, generated, seconds, steps = 0, 0, 0, 0.0, 0
    for samples in pipe.chunks(**arguments):
        for text in samples.outputs:
            rows += 1
            print(f"=== sample {rows} ===\n{text}\n")
        sys.stdout.flush()  # each chunk is out before the next is drawn: memory holds one chunk
        length, steps = samples.tokens.shape[1], samples.steps
        generated, seconds = generated + samples.generated, seconds + samples.seconds
    print(f"{rows} x {length} positions, {generated} generated in {steps} steps: {seconds:.2f} s "
          f"({generated / seconds:.0f} generated tokens/s)", file=sys.stderr)
    return 0


def _print_images(args, pipe, samples) -> int:
    import torch

    from ..pictures import save_grid

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
