"""The training view's attention alone, forward and backward: dense masked SDPA vs grouped (a loop
over rows and groups) vs jagged (one nested-tensor call), at length 1024, 12 heads of 64, for an
even split and a 5% group, in the encoder's view (same group) and the decoder's (other group).

    python benchmarks/training_attention.py OUT.json [--device cuda] [--batches 1 4]

Best of three alternating passes per row; prints one line per row and writes the JSON."""

import argparse
import json
import time

import torch
import torch.nn.functional as F

from pgm.devices import synchronize
from pgm.models.layers import GroupMask, grouped_attention, jagged_attention


def dense_attention(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)


KINDS = {"dense": dense_attention, "grouped": grouped_attention, "jagged": jagged_attention}


def seconds(attention, q, k, v, groups, same, device) -> float:
    synchronize(device)
    started = time.perf_counter()
    attention(q, k, v, GroupMask(groups, groups, same)).sum().backward()
    synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for batch in args.batches:
        for share in (0.5, 0.05):
            for same in (True, False):
                generator = torch.Generator().manual_seed(0)
                groups = (torch.rand(batch, 1024, generator=generator) < share).to(device)
                q, k, v = (torch.randn(batch, 12, 1024, 64, generator=generator).to(device).requires_grad_()
                           for _ in range(3))
                best = {}
                for repeat in range(4):  # the first pass warms up
                    for name, attention in KINDS.items():
                        elapsed = seconds(attention, q, k, v, groups, same, device)
                        if repeat:
                            best[name] = min(best.get(name, float("inf")), elapsed)
                row = {"batch": batch, "share": share, "view": "encoder" if same else "decoder",
                       **{f"{name}_ms": round(1000 * value, 1) for name, value in best.items()}}
                rows.append(row)
                print(row, flush=True)
    with open(args.out, "w") as file:
        json.dump({"device": str(device), "threads": torch.get_num_threads(), "results": rows}, file, indent=1)


if __name__ == "__main__":
    main()
