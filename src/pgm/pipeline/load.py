"""`pgm.load(source)`: the pipeline of a run, a pretrained directory, a released checkpoint, an
mdlm-owt directory or a Hub id; and `convert`, a released checkpoint or an mdlm-owt directory
written as a pretrained directory."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import load_tokenizer
from ..data.tokenizers import GPT2Tokenizer, named_tokenizer
from ..devices import Precision, describe_precision, resolve_device
from ..errors import ArgumentError, DataError
from ..formats import TOKENIZER_DIR, replaced_directory
from ..hub import from_pretrained, is_transformers_directory
from ..models import is_image_model
from ..runs import CHECKPOINTS
from ..sampling.compiled import check_compile_mode
from ..vq_tokenizer import VQTokenizer, load_vq_tokenizer
from .base import Pipeline
from .image import ImagePipeline, VQPipeline
from .text import TextPipeline


def load(source: str | Path, *, device: str | torch.device = "auto", weights: str | None = None,
         precision: Precision = "auto", vq: str | Path | None = None, gpt2_file: str | None = None,
         compile: str | None = None, revision: str | None = None, token: str | None = None,
         **import_options) -> Pipeline:
    """The pipeline for `source`: a run directory, a pretrained directory, a released checkpoint
    file or a Hub id, on `device` ("auto": a GPU when there is one) in `precision` ("auto": bf16
    autocast on a GPU, float32 on a CPU). `weights`: "ema" (the average) or "raw"; by default the
    average where the source has one. `vq` overrides an image model's VQ tokenizer (a VQ run or
    pretrained directory, or LlamaGen's file); `gpt2_file` is GPT-2's BPE file for checkpoints that
    name GPT-2's tokenizer (offline). `compile`: a torch.compile mode for the sampling network of
    a PGM, MDLM or MaskGIT (see `pgm.sampling.compiled`); None: eager. `revision` (a branch, tag or
    commit) and `token` (for a private repository) apply to Hub ids. `import_options` apply to
    released checkpoint files (see `pgm.importers`)."""
    device = resolve_device(device)
    describe_precision(device, precision)  # checks its name
    check_compile_mode(compile)
    model = from_pretrained(source, weights=weights, revision=revision, token=token, **import_options)
    config, origin = model.config, model.origin
    if compile and config.kind not in ("pgm", "mdlm", "maskgit"):
        raise ArgumentError(f"compile applies to sampling a PGM, MDLM or MaskGIT; {source} holds a {config.kind} model")
    if config.kind == "classifier":
        raise ArgumentError(f"{source} holds the feature classifier of `pgm eval --fid`, not a generative model")
    if vq is not None and not is_image_model(config):
        raise ArgumentError(f"vq applies to image models; {source} holds a {config.kind} model")
    if gpt2_file is not None and (is_image_model(config) or origin.tokenizer_dir is not None
                                  or not (origin.tokenizer_name or "").startswith("gpt2")):
        raise ArgumentError(f"gpt2_file is for checkpoints that name GPT-2's tokenizer without carrying it; {source} "
                            "does not")
    if config.kind == "vq":
        return VQPipeline(model.to(device), VQTokenizer(model, Path(origin.source)), device, precision, str(source))
    if is_image_model(config):
        tokenizer_dir = Path(vq) if vq is not None else origin.tokenizer_dir
        if tokenizer_dir is None:
            raise ArgumentError(f"{source} names no VQ tokenizer to decode its codes: pass vq=PATH (--vq PATH), a VQ "
                                "directory or LlamaGen's vq_ds8_c2i.pt")
        tokenizer = _checked_vq(model, tokenizer_dir, source)
        tokenizer.model.to(device)
        return ImagePipeline(model.to(device), tokenizer, device, precision, str(source), compile)
    if origin.tokenizer_dir is not None:
        tokenizer = load_tokenizer(origin.tokenizer_dir)
    elif origin.tokenizer_name:
        tokenizer = named_tokenizer(origin.tokenizer_name, gpt2_file)
    else:
        raise ArgumentError(f"{source} has no tokenizer (no tokenizer/ directory and none named), so its samples "
                            "cannot be turned into text")
    if tokenizer.model_vocab_size > config.vocab_size:
        raise ArgumentError(f"the tokenizer of {source} has {tokenizer.model_vocab_size} ids but the model only "
                            f"{config.vocab_size}")
    return TextPipeline(model.to(device), tokenizer, device, precision, str(source), compile)


def convert(checkpoint: str | Path, out_dir: str | Path, *, weights: str | None = None, gpt2_file: str | None = None,
            vq: str | Path | None = None, vq_reference: bool = False, **import_options) -> tuple[Path, str]:
    """A released checkpoint file, or a directory in kuleshov-group/mdlm-owt's transformers layout,
    written as a pretrained directory (`pgm convert official`): the authors' text models and
    mdlm-owt with GPT-2's BPE file when one is found offline (else the tokenizer is
    recorded by name and found when loaded), their image models with the VQ tokenizer `vq` (held
    in tokenizer/, or only named there with `vq_reference`), LlamaGen's VQ on its own. Returns the
    directory and what it says of the tokenizer."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_file() and not is_transformers_directory(checkpoint):
        raise ArgumentError(f"{checkpoint} is neither a checkpoint file nor a directory in kuleshov-group/mdlm-owt's "
                            "transformers layout")
    if (out_dir / CHECKPOINTS).exists():
        raise ArgumentError(f"{out_dir} is a training run; choose another output directory")
    model = from_pretrained(checkpoint, weights=weights, **import_options)
    image = is_image_model(model.config)
    if (vq is not None or vq_reference) and not image:
        raise ArgumentError(f"vq applies to image models; {checkpoint} holds a {model.config.kind} model")
    if gpt2_file is not None and not (model.origin.tokenizer_name or "").startswith("gpt2"):
        raise ArgumentError(f"gpt2_file is for checkpoints that name GPT-2's tokenizer; {checkpoint} does not")
    tokenizer = None
    if image and vq is not None:
        tokenizer = _checked_vq(model, vq, checkpoint)
    elif vq_reference:
        raise ArgumentError("vq_reference names the VQ given as vq; give vq")
    elif (model.origin.tokenizer_name or "").startswith("gpt2"):
        try:
            tokenizer = GPT2Tokenizer(gpt2_file)
        except DataError:
            if gpt2_file:
                raise
    if vq_reference:
        model.save_pretrained(out_dir, keep_tokenizer=False)
        with replaced_directory(out_dir / TOKENIZER_DIR) as temporary:
            tokenizer.save_reference(temporary, Path(vq))
        return out_dir, f"the VQ tokenizer {vq} named in tokenizer/"
    model.save_pretrained(out_dir, tokenizer)
    if tokenizer is not None:
        return out_dir, "its tokenizer in tokenizer/"
    if model.origin.tokenizer_name:
        return out_dir, f"the tokenizer {model.origin.tokenizer_name} named (found when loaded)"
    return out_dir, "no tokenizer" + (" (give --vq to decode its codes)" if image else "")


def _checked_vq(model, vq: str | Path, source) -> VQTokenizer:
    """The VQ tokenizer at `vq`, refused unless its codebook is the one `model` was trained on."""
    tokenizer = load_vq_tokenizer(vq)
    config = model.config
    codes = config.codebook_size if config.kind == "maskgit" else config.mask_token_id
    cells = config.length if config.kind == "maskgit" else config.length - 1  # the PGM's rows start with a BOS
    if (tokenizer.codebook_size, tokenizer.num_tokens) != (codes, cells):
        hint = (f" (an image PGM's length is not in its weights: for this VQ it is {1 + tokenizer.num_tokens}, given "
                "as length or --length)" if config.kind == "pgm" and tokenizer.codebook_size == codes else "")
        raise ArgumentError(f"the VQ tokenizer {vq} makes {tokenizer.num_tokens} codes of {tokenizer.codebook_size} "
                            f"per image, but the model {source} was trained on {cells} of {codes}{hint}")
    return tokenizer
