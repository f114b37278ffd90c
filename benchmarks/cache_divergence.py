"""Where the PGM's approximate encoder cache breaks: at every step of cached sampling, the
divergence of the cached prediction from the exact one for the same clean set and queries.

Generative perplexity needs a good model and many samples to resolve a small loss of quality;
this asks the model itself. Along each cached sampling trajectory, every call's logits are
compared with `predict`'s (the exact encoder over the same clean tokens): KL(exact || cached) per
decoded token (mask id excluded), and how often the two agree on the most likely token. Writes
JSON, prints a table and plots the KL over the course of sampling.

    python benchmarks/cache_divergence.py RUN --steps 32 128 --refresh 2 4 8 16 never --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import pgm
from pgm.sampling import SamplingOptions, sample_pgm
from pgm.sampling.settings import cache_settings, refresh_interval


def measure(model, bos: int, *, steps: int, refresh, growth, num_samples: int, batch_size: int, seed: int) -> dict:
    """Unconditional samples after a BOS; per call: mean KL(exact || cached) per query and top-1
    agreement, over every row."""
    config = model.config
    cached_call = model.predict_cached
    per_call: list[list[float]] = []

    def probe(cache, slot_tokens, slot_positions, visible, queries, cond=None, *, refresh=False):
        logits = cached_call(cache, slot_tokens, slot_positions, visible, queries, cond, refresh=refresh)
        lengths = visible if isinstance(visible, torch.Tensor) else None
        width = int(visible.max()) if lengths is not None else visible
        exact = model.predict(slot_tokens[:, :width], slot_positions[:, :width], queries, lengths, cond,
                              check_inputs=False)
        exact[..., config.mask_token_id] = logits[..., config.mask_token_id] = float("-inf")
        p, log_p, log_q = exact.softmax(-1), exact.log_softmax(-1), logits.log_softmax(-1)
        kl = (p * (log_p - log_q)).nan_to_num(0.0).sum(-1)
        agree = (exact.argmax(-1) == logits.argmax(-1)).float()
        index = probe.calls
        probe.calls += 1
        while len(per_call) <= index:
            per_call.append([0.0, 0.0, 0])
        per_call[index][0] += float(kl.sum())
        per_call[index][1] += float(agree.sum())
        per_call[index][2] += kl.numel()
        return logits

    model.predict_cached = probe
    generator = torch.Generator().manual_seed(seed)
    try:
        for low in range(0, num_samples, batch_size):
            rows = min(batch_size, num_samples - low)
            known = torch.zeros(rows, config.length, dtype=torch.long)
            mask = torch.zeros_like(known, dtype=torch.bool)
            known[:, 0], mask[:, 0] = bos, True
            probe.calls = 0
            sample_pgm(model, known_tokens=known, known_mask=mask, steps=steps, generator=generator,
                       options=SamplingOptions(float64=True), cache_refresh=refresh, cache_growth=growth)
    finally:
        del model.predict_cached
    kl = [total / count for total, _, count in per_call]
    agree = [same / count for _, same, count in per_call]
    queries = sum(count for *_, count in per_call)
    return {"steps": steps, "cache_refresh": refresh, "cache_growth": growth,
            "mean_kl": sum(total for total, _, _ in per_call) / queries,
            "top1_agreement": sum(same for _, same, _ in per_call) / queries,
            "worst_step": max(range(len(kl)), key=kl.__getitem__), "worst_kl": max(kl),
            "kl_by_step": kl, "agreement_by_step": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a PGM run or pretrained directory")
    parser.add_argument("--steps", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--refresh", type=refresh_interval, nargs="+", default=[2, 4, 8, 16, "never"])
    parser.add_argument("--growth", type=float, nargs="*", default=[0.5],
                        help="also: never refresh by count, only when the clean set grew by this fraction")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    pipe = pgm.load(args.run)
    if pipe.config.kind != "pgm":
        parser.error(f"{args.run} holds a {pipe.config.kind} model; the encoder cache is a PGM's")
    try:
        settings = cache_settings(args.refresh, args.growth)
    except ValueError as error:
        parser.error(str(error))
    rows = []
    with torch.no_grad():
        for steps in args.steps:
            steps = min(steps, pipe.config.length - 1)
            for refresh, growth in settings:
                rows.append(measure(pipe.model, pipe.tokenizer.bos_id, steps=steps, refresh=refresh, growth=growth,
                                    num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed))
                row = rows[-1]
                print(f"L={pipe.config.length} steps={steps:<4} refresh={refresh!s:<6} growth={growth!s:<5} "
                      f"KL {row['mean_kl']:.4f} nats/token, top-1 agreement {100 * row['top1_agreement']:.1f}%, "
                      f"worst at step {row['worst_step']} ({row['worst_kl']:.4f})", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"run": args.run, "length": pipe.config.length, "num_samples": args.num_samples, "seed": args.seed,
              "results": rows}
    (args.out / "cache_divergence.json").write_text(json.dumps(report, indent=1))
    print("\n| steps | refresh | growth | KL(exact ‖ cached), nats/token | top-1 agreement | worst step (KL) |")
    print("|---:|---|---|---:|---:|---|")
    for row in rows:
        print(f"| {row['steps']} | {row['cache_refresh']} | {row['cache_growth'] or '-'} | {row['mean_kl']:.4f} | "
              f"{100 * row['top1_agreement']:.1f}% | {row['worst_step']} ({row['worst_kl']:.3f}) |")
    plot(report, args.out / "cache_divergence.png")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_list = sorted({row["steps"] for row in report["results"]})
    figure, axes = plt.subplots(1, len(steps_list), figsize=(6 * len(steps_list), 4), squeeze=False, sharey=True)
    for axis, steps in zip(axes[0], steps_list):
        for row in (r for r in report["results"] if r["steps"] == steps):
            label = f"refresh {row['cache_refresh']}" + (f", growth {row['cache_growth']}" if row["cache_growth"]
                                                          else "")
            fractions = [(i + 0.5) / len(row["kl_by_step"]) for i in range(len(row["kl_by_step"]))]
            axis.plot(fractions, [max(k, 1e-6) for k in row["kl_by_step"]], label=label)
        axis.set_yscale("log")
        axis.set_xlabel("share of the sampling steps done")
        axis.set_title(f"length {report['length']}, {steps} steps")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel("KL(exact || cached) per decoded token (nats)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
