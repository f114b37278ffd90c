"""`pgm harness`: downstream tasks through EleutherAI's lm-evaluation-harness."""

from __future__ import annotations

from .common import add_loading_options


def register(commands) -> None:
    harness = commands.add_parser("harness", help="downstream tasks through EleutherAI's lm-evaluation-harness "
                                                  "(pip install 'partition-gm[harness]')")
    harness.add_argument("source", metavar="RUN", help="a text run, a pretrained directory or the authors' checkpoint")
    harness.add_argument("--tasks", nargs="+", required=True,
                         help="harness task names: pgm_lambada and pgm_cloze are built offline from the built-in "
                              "corpus's validation split; others come from the harness (the Hub) or --include")
    harness.add_argument("--num-mc", type=int, help="Monte-Carlo samples per log-likelihood (PGM, MDLM; default "
                                                    "128; AR is exact)")
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


def cmd_harness(args) -> int:
    from lm_eval.utils import make_table

    from ..harness import evaluate

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
