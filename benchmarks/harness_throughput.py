"""How fast the harness scores: examples per second of the conditional log-likelihood at N
Monte-Carlo samples, batched across examples (what `pgm harness` does) against one example at a
time (its samples in one batch) and against one sample per model call (the shape of a loop over
examples and samples), for each model, side by side in one process. The examples are the first
`--examples` of the offline `pgm_lambada` task. Writes JSON and prints a table.

    python benchmarks/harness_throughput.py runs/text-small runs/mdlm-small --num-mc 128 --out DIR
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import pgm
from pgm.eval.likelihood import context_keys, suffix_scores
from pgm.harness.model import HarnessModel
from pgm.harness.tasks import builtin_validation_documents, last_word_examples


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def measure(source: str, examples: list[dict], *, num_mc: int, batch_size: int, single_examples: int) -> list[dict]:
    adapter = HarnessModel(pipeline=pgm.load(source, device="cpu"), num_mc=num_mc, progress=False)
    pipe = adapter.pipe
    items = adapter.items([(example["context"], example["target"]) for example in examples])
    keys = context_keys(items)
    objective = adapter.objective

    def score(part, size):
        return suffix_scores(pipe.model, objective, [items[i] for i in part], passes=num_mc, batch_size=size,
                             noise_keys=[keys[i] for i in part])

    score(range(2), batch_size)  # warm-up
    rows = []
    seconds, batched = timed(lambda: score(range(len(items)), batch_size))
    rows.append({"mode": "batched", "examples": len(items), "seconds": seconds})
    seconds, alone = timed(lambda: [score([i], num_mc)[0] for i in range(len(items))])
    rows.append({"mode": "one example per call", "examples": len(items), "seconds": seconds})
    assert all(abs(a.nll - b.nll) < 1e-3 * max(1.0, abs(a.nll)) for a, b in zip(batched, alone))
    few = range(min(single_examples, len(items)))
    seconds, _ = timed(lambda: [score([i], 1) for i in few])
    rows.append({"mode": "one sample per call", "examples": len(few), "seconds": seconds})
    for row in rows:
        row.update(model=Path(source).name, kind=pipe.config.kind, num_mc=num_mc, batch_size=batch_size,
                   examples_per_s=row["examples"] / row["seconds"],
                   ratio_to_batched=(row["examples"] / row["seconds"]) / (rows[0]["examples"] / rows[0]["seconds"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="PGM or MDLM runs (AR is exact: one pass)")
    parser.add_argument("--num-mc", type=int, default=128)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--single-examples", type=int, default=2, help="examples timed one sample per call")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="harness-throughput-"))
    args = parser.parse_args()
    torch.manual_seed(0)
    examples = last_word_examples(builtin_validation_documents())[:args.examples]
    rows = [row for source in args.sources
            for row in measure(source, examples, num_mc=args.num_mc, batch_size=args.batch_size,
                               single_examples=args.single_examples)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "harness_throughput.json").write_text(json.dumps(
        {"device": "cpu", "threads": torch.get_num_threads(), "dtype": "float32", "rows": rows}, indent=2) + "\n")
    print(f"{'model':<12} {'kind':<5} {'mode':<22} {'examples':>8} {'seconds':>8} {'examples/s':>10} {'x batched':>9}")
    for row in rows:
        print(f"{row['model']:<12} {row['kind']:<5} {row['mode']:<22} {row['examples']:>8} {row['seconds']:>8.1f} "
              f"{row['examples_per_s']:>10.3f} {row['ratio_to_batched']:>9.2f}")
    print(f"wrote {out / 'harness_throughput.json'}")


if __name__ == "__main__":
    main()
