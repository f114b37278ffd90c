"""`pgm prepare` against a nanoGPT-style preparation (`datasets.map(num_proc=N)` into a uint16
memmap), on synthetic .jsonl corpora of growing size built from the built-in corpus's paragraphs,
with OpenWebText's recipe (GPT-2's BPE, length 1024, wrapped, the last 1.25% of documents held
out, as 100k of OWT's 8M).

    python benchmarks/data_prepare.py --sizes 100 300 1000 --workers 2 --out docs/bench-cpu/data-prepare

Each preparation runs as its own process tree, the two methods alternating at each size; a
sampler reads the tree's memory from /proc every 0.1 s: the sum of RSS (what `ps` shows: forked
workers count the pages they share with their parent again) and the sum of PSS (shared pages
split between the processes that share them: the memory the tree really holds). Throughput is
the corpus file's MB per wall second. Writes OUT.json, OUT.png and prints a table with the
extrapolation to OpenWebText (38 GB of text) on 2 and 32 cores.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

OWT_BYTES = 38e9  # OpenWebText's text, as its .jsonl would hold it
OWT_TOKENS = 9.04e9

NANOGPT_STYLE = r"""
import sys, time, json
import numpy as np
from datasets import load_dataset
import tiktoken
from tiktoken.load import load_tiktoken_bpe

source, out, workers, ranks_file, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
pattern = r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"
ranks = load_tiktoken_bpe(ranks_file)
encoding = tiktoken.Encoding("gpt2", pat_str=pattern, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)})
phases = {}
started = time.perf_counter()
dataset = load_dataset("json", data_files=source, split="train", cache_dir=cache)
split = dataset.train_test_split(test_size=0.0005, seed=2357, shuffle=True)
split["val"] = split.pop("test")
phases["load"] = time.perf_counter() - started

def encode(example):
    ids = encoding.encode_ordinary(example["text"])
    ids.append(encoding.eot_token)
    return {"ids": ids, "len": len(ids)}

started = time.perf_counter()
tokenized = split.map(encode, remove_columns=["text"], num_proc=workers)
phases["tokenize"] = time.perf_counter() - started
started = time.perf_counter()
tokens = 0
for name, part in tokenized.items():
    length = int(np.sum(part["len"], dtype=np.uint64))
    array = np.memmap(f"{out}/{name}.bin", dtype=np.uint16, mode="w+", shape=(length,))
    batches, at = min(1024, len(part)), 0
    for index in range(batches):
        batch = part.shard(num_shards=batches, index=index, contiguous=True).with_format("numpy")
        ids = np.concatenate(batch["ids"])
        array[at:at + len(ids)] = ids
        at += len(ids)
    array.flush()
    tokens += length
phases["write"] = time.perf_counter() - started
print(json.dumps({"phases": phases, "tokens": tokens}))
"""


def build_corpus(path: Path, megabytes: int) -> int:
    """A .jsonl of documents of 1-12 paragraphs of the built-in corpus (OpenWebText's documents
    average about 4.7 kB), in a seeded random order, until `megabytes` MB; returns the documents."""
    from pgm.data.corpus import builtin_documents

    paragraphs = [p for book in builtin_documents() for p in book.split("\n\n")]
    generator = np.random.default_rng(0)
    written, documents = 0, 0
    temporary = path.with_suffix(".partial")
    with open(temporary, "w") as handle:
        while written < megabytes * 1e6:
            count = int(generator.integers(1, 13))
            start = int(generator.integers(0, len(paragraphs) - count))
            line = json.dumps({"text": "\n\n".join(paragraphs[start:start + count])}) + "\n"
            handle.write(line)
            written += len(line.encode())
            documents += 1
    temporary.rename(path)
    return documents


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def memory(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of one process in MB, or zeros once it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0.0, 0.0
    values = dict(re.findall(r"^(Rss|Pss):\s+(\d+) kB", rollup, re.MULTILINE))
    return int(values.get("Rss", 0)) / 1024, int(values.get("Pss", 0)) / 1024


def measured(command: list[str], env: dict) -> dict:
    """Run `command`; its wall time, output, and the peaks of its tree's summed RSS and PSS."""
    peaks = {"rss": 0.0, "pss": 0.0, "main_rss": 0.0}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    done = threading.Event()

    def sample():
        while not done.is_set():
            values = [memory(pid) for pid in tree(process.pid)]
            peaks["rss"] = max(peaks["rss"], sum(v[0] for v in values))
            peaks["pss"] = max(peaks["pss"], sum(v[1] for v in values))
            peaks["main_rss"] = max(peaks["main_rss"], memory(process.pid)[0])
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if process.returncode:
        raise RuntimeError(f"{command[:4]} failed:\n{stderr[-3000:]}")
    return {"seconds": seconds, "stdout": stdout, **{f"peak_{k}_mb": round(v, 1) for k, v in peaks.items()}}


def tiktoken_rate(corpus: Path, ranks: str, megabytes: float = 30.0) -> float:
    """MB/s of tiktoken's encode_ordinary on one core, over the first documents of the corpus
    (MB of their .jsonl lines, the measure every rate here uses)."""
    from pgm.data.tokenizers import GPT2Tokenizer

    encoding = GPT2Tokenizer(ranks).encoding
    texts, size = [], 0
    with open(corpus) as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
            size += len(line.encode())
            if size >= megabytes * 1e6:
                break
    started = time.perf_counter()
    for text in texts:
        encoding.encode_ordinary(text)
    return size / 1e6 / (time.perf_counter() - started)


def ours(corpus: Path, out: Path, workers: int, documents: int, ranks: str, env: dict) -> dict:
    held_out = max(1, documents * 100_000 // 8_013_769)  # OWT's 100k of 8.0M
    command = [sys.executable, "-m", "pgm", "prepare", "--preset", "pgm-owt-8-8", "--out", str(out), "--workers",
               str(workers), f"data.source={corpus}", f"data.gpt2_file={ranks}", f"data.val_last={held_out}"]
    result = measured(command, env)
    meta = json.loads((out / "data" / "meta.json").read_text())
    said = re.search(r"in ([\d.]+) s with \d+ worker\(s\): read (\d+)%, tokenize \d+x(\d+)%, pack (\d+)%, "
                     r"write (\d+)%, finish (\d+)%", result.pop("stdout"))
    elapsed, read, busy, pack, write, finish = map(float, said.groups())
    tokens = sum(meta["splits"][name]["tokens"] for name in ("train", "val"))
    phases = {"start": result["seconds"] - elapsed, "main_streaming": elapsed * (read + pack + write) / 100,
              "tokenize_work": elapsed * busy / 100 * workers, "finish": elapsed * finish / 100}
    return {**result, "tokens": tokens, "phases": {k: round(v, 2) for k, v in phases.items()}}


def nanogpt_style(corpus: Path, out: Path, workers: int, ranks: str, env: dict) -> dict:
    out.mkdir(parents=True)
    result = measured([sys.executable, "-c", NANOGPT_STYLE, str(corpus), str(out), str(workers), ranks,
                       str(out / "cache")], env)
    printed = json.loads(result.pop("stdout").strip().splitlines()[-1])
    return {**result, "tokens": printed["tokens"], "phases": printed["phases"]}


def extrapolate(row: dict, size_bytes: float, cores: int) -> float:
    """Hours for OpenWebText: on the cores measured, the wall time after start-up scaled to its
    size; on more cores, one worker each, the parallel work (the tokenizing) spread over them and
    the serial work as measured (ours: the main process's reading, packing and writing, which
    overlaps the workers, then its finishing pass; nanoGPT-style: loading the .jsonl into Arrow,
    then writing the memmap)."""
    scale, phases = OWT_BYTES / size_bytes, row["phases"]
    mine = row["method"] == "pgm prepare"
    start = phases["start"] if mine else row["seconds"] - phases["load"] - phases["tokenize"] - phases["write"]
    if cores == row["workers"]:
        return (start + scale * (row["seconds"] - start)) / 3600
    if mine:
        return (start + scale * (max(phases["main_streaming"], phases["tokenize_work"] / cores) + phases["finish"])) / 3600
    return (start + scale * (phases["load"] + phases["write"] + phases["tokenize"] * row["workers"] / cores)) / 3600


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method, color in zip(dict.fromkeys(r["method"] for r in rows), ("tab:orange", "tab:blue")):
        mine = [r for r in rows if r["method"] == method]
        sizes = [r["megabytes"] for r in mine]
        left.plot(sizes, [r["mb_per_s"] for r in mine], "o-", color=color, label=method)
        right.plot(sizes, [r["peak_rss_mb"] for r in mine], "o-", color=color, label=f"{method}: summed RSS")
        right.plot(sizes, [r["peak_pss_mb"] for r in mine], "s--", color=color, label=f"{method}: summed PSS")
    left.set(xscale="log", xlabel="corpus (MB of .jsonl)", ylabel="MB/s", title="throughput (2 workers)")
    right.set(xscale="log", xlabel="corpus (MB of .jsonl)", ylabel="peak memory of the process tree (MB)",
              title="memory")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000], help="corpus sizes in MB")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default="/tmp/pgm-bench-data", help="where the corpora and outputs go")
    parser.add_argument("--out", default="docs/bench-cpu/data-prepare", help="OUT.json and OUT.png")
    args = parser.parse_args()
    from pgm.data.tokenizers import find_gpt2_file

    ranks = find_gpt2_file()
    if ranks is None:
        sys.exit("needs GPT-2's BPE file offline: pip install --no-deps openai-whisper, or set PGM_GPT2_TIKTOKEN")
    ranks = str(ranks)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    rate = None
    for megabytes in args.sizes:
        corpus = work / f"corpus-{megabytes}mb.jsonl"
        if not corpus.exists():
            print(f"building {corpus} ...", flush=True)
            build_corpus(corpus, megabytes)
        documents = sum(1 for _ in open(corpus, "rb"))
        size = corpus.stat().st_size
        if rate is None:
            rate = tiktoken_rate(corpus, ranks)
        for method in ("pgm prepare", "nanoGPT-style") if megabytes % 2 else ("nanoGPT-style", "pgm prepare"):
            out = work / f"out-{megabytes}-{method.split()[0].lower()}"
            shutil.rmtree(out, ignore_errors=True)
            result = (ours(corpus, out, args.workers, documents, ranks, env) if method == "pgm prepare" else
                      nanogpt_style(corpus, out, args.workers, ranks, env))
            shutil.rmtree(out, ignore_errors=True)
            row = {"method": method, "megabytes": megabytes, "bytes": size, "documents": documents,
                   "workers": args.workers, **result, "mb_per_s": round(size / 1e6 / result["seconds"], 2),
                   "tokens_per_s": round(result["tokens"] / result["seconds"])}
            row["tiktoken_share"] = round(row["mb_per_s"] / (rate * args.workers), 3)
            row["owt_hours_2_cores"] = round(extrapolate(row, size, 2), 2)
            row["owt_hours_32_cores"] = round(extrapolate(row, size, 32), 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\ntiktoken encode_ordinary alone: {rate:.1f} MB/s on one core; {os.cpu_count()} cores here, "
          f"{args.workers} workers\n")
    print("| corpus | method | s | MB/s | tokens/s | x nanoGPT-style | share of tiktoken x workers | peak RSS sum (MB) | "
          "peak PSS sum (MB) | OWT h, 2 cores | OWT h, 32 cores |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        other = next(r for r in rows if r["megabytes"] == row["megabytes"] and r["method"] != row["method"])
        print(f"| {row['megabytes']} MB | {row['method']} | {row['seconds']:.1f} | {row['mb_per_s']:.1f} | "
              f"{row['tokens_per_s'] / 1e6:.2f}M | {row['mb_per_s'] / other['mb_per_s']:.2f} | "
              f"{row['tiktoken_share']:.2f} | {row['peak_rss_mb']:.0f} | {row['peak_pss_mb']:.0f} | "
              f"{row['owt_hours_2_cores']:.1f} | {row['owt_hours_32_cores']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"tiktoken_mb_per_s_one_core": round(rate, 2), "cores":
                                                    os.cpu_count(), "rows": rows}, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
