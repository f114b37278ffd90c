"""The validation curves of docs/training.md's comparison of our defaults with the reference
implementation's choices (preset text-small, 400 steps, the built-in corpus).

    python docs/defaults/plot.py RUN_DIR ...   # read the runs, keep what the plot needs in runs.json
    python docs/defaults/plot.py               # plot again from runs.json

Each run directory's config.json says its configuration (train.complement, train.bos_always_clean,
train.seed) and its metrics.jsonl holds the validation records ("step", "val_nll": the ELBO in nats
per token on the first train.eval_rows validation rows, one Monte-Carlo pass). Writes
validation.png and runs.json beside this file and prints the table of the last validation of each
run. Needs only the standard library and matplotlib.
"""

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIGURATIONS = {  # (complement, bos_always_clean) -> name, colour
    ("exact", True): ("default: complement=exact, BOS always clean", "tab:blue"),
    ("one_minus_t", True): ("complement=one_minus_t", "tab:orange"),
    ("one_minus_t", False): ("reference: complement=one_minus_t, BOS in the partition", "tab:red"),
    ("exact", False): ("complement=exact, BOS in the partition", "tab:green"),
}


def read_run(run: Path) -> dict:
    train = json.loads((run / "config.json").read_text())["train"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    validation = [[r["step"], r["val_nll"]] for r in records if "val_nll" in r]
    meta = run / "data" / "meta.json"
    unigram = json.loads(meta.read_text()).get("unigram_val_nll") if meta.exists() else None
    return {"run": str(run), "complement": train["complement"], "bos_always_clean": train["bos_always_clean"],
            "seed": train["seed"], "steps": train["max_steps"], "eval_rows": train["eval_rows"],
            "validation": validation, "unigram_val_nll": unigram}


def main(arguments: list[str]) -> None:
    if arguments:
        runs = [read_run(Path(argument)) for argument in arguments]
        (HERE / "runs.json").write_text("[\n" + ",\n".join(json.dumps(run) for run in runs) + "\n]\n")
    else:
        runs = json.loads((HERE / "runs.json").read_text())
    figure, axis = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":", "-."]
    seeds = sorted({run["seed"] for run in runs})
    for run in runs:
        name, colour = CONFIGURATIONS[(run["complement"], run["bos_always_clean"])]
        steps, nll = zip(*run["validation"])
        axis.plot(steps, nll, styles[seeds.index(run["seed"]) % len(styles)], color=colour, marker="o",
                  label=f"{name} (seed {run['seed']})")
    unigram = next((run["unigram_val_nll"] for run in runs if run["unigram_val_nll"]), None)
    if unigram:
        axis.axhline(unigram, color="grey", linewidth=0.8, linestyle=":", label="unigram model of the corpus")
    axis.set_xlabel("training step (batch 32 x 128 tokens)")
    axis.set_ylabel("validation ELBO (nats/token, 128 rows)")
    axis.set_title("text-small on the built-in corpus: our defaults and the reference choices")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(HERE / "validation.png", dpi=120)
    print("| configuration | seed | validation ELBO at the last step (nats/token) | perplexity bound |")
    print("|---|---:|---:|---:|")
    for run in sorted(runs, key=lambda r: (list(CONFIGURATIONS).index((r["complement"], r["bos_always_clean"])),
                                           r["seed"])):
        name = CONFIGURATIONS[(run["complement"], run["bos_always_clean"])][0]
        step, nll = run["validation"][-1]
        print(f"| {name} | {run['seed']} | {nll:.3f} (step {step}) | {math.exp(nll):.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
