"""`pgm convert official`: a released checkpoint (the authors' text and image models, LlamaGen's VQ,
a directory in kuleshov-group/mdlm-owt's transformers layout) written as a pretrained directory."""

from __future__ import annotations

import json

from ..formats import check_writable
from .common import given


def register(commands) -> None:
    convert = commands.add_parser("convert", help="import released checkpoints (the authors' text and image "
                                                  "models, LlamaGen's VQ, kuleshov-group/mdlm-owt) into our format")
    convert.add_argument("source", choices=("official",), help="official: a released file; which one it is (text, "
                                                               "image PGM, MaskGIT, VQ) is read from its content")
    convert.add_argument("checkpoint", help="the released file, or a directory in kuleshov-group/mdlm-owt's "
                                            "transformers layout (config.json, model.safetensors or pytorch_model.bin)")
    convert.add_argument("out_dir")
    convert.add_argument("--weights", choices=("ema", "raw"),
                         help="text: the EMA average (default, when the file has one) or the raw weights")
    convert.add_argument("--gpt2-file", help="text (mdlm-owt too): a local gpt2.tiktoken to store with the model "
                                             "(offline use)")
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


def cmd_convert(args) -> int:
    from ..pipeline import convert

    check_writable(args.out_dir)
    out, tokenizer = convert(args.checkpoint, args.out_dir, weights=args.weights, gpt2_file=args.gpt2_file,
                             vq=args.vq, vq_reference=args.vq_reference,
                             **given(args, pre_query_mode="pre_query_mode", length="length",
                                     mask_token_id="mask_id", num_heads="num_heads", image_size="image_size"))
    model = json.loads((out / "config.json").read_text())["model"]
    print(f"wrote {out}: a {model['kind']} model, {(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB of "
          f"weights, {tokenizer}")
    return 0
