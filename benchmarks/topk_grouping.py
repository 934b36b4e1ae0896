"""Does grouping same-shaped factors into one ``topk`` call help? Grouped against per-tensor, same scores, same run.

    python benchmarks/topk_grouping.py [--hidden 512 --intermediate 1376 --layers 4 --rank 8 --keep-ratio 0.1]

The scores have the shapes RoseLoRA prunes in a Llama-shaped model with all 7 projections adapted: rows of
``lora_A`` ``(r, in)`` and columns of ``lora_B`` as rows of ``B^T`` ``(r, out)``. Both variants build the same boolean
masks (checked); interleaved timing, medians of 200 repetitions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from peft_roselora import sparsity


def per_tensor(scores, keeps):
    return [
        torch.zeros_like(s, dtype=torch.bool).scatter_(1, s.topk(k, dim=1, sorted=False).indices, True)
        for s, k in zip(scores, keeps)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--keep-ratio", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    h, m, r = args.hidden, args.intermediate, args.rank
    # (in, out) of q, k, v, o, gate, up, down
    shapes = [(h, h), (h, h), (h, h), (h, h), (h, m), (h, m), (m, h)] * args.layers
    generator = torch.Generator().manual_seed(0)
    scores = []
    for fan_in, fan_out in shapes:
        scores.append(torch.rand(r, fan_in, generator=generator))  # lora_A rows
        scores.append(torch.rand(fan_out, r, generator=generator).T)  # lora_B columns as rows
    keeps = [sparsity.kept_count(args.keep_ratio, s.shape[1]) for s in scores]
    assert all(torch.equal(a, b) for a, b in zip(sparsity.row_topk_masks(scores, keeps), per_tensor(scores, keeps)))
    timings = {"grouped": [], "per-tensor": []}
    for _ in range(args.repeats):
        for name, function in (("grouped", sparsity.row_topk_masks), ("per-tensor", per_tensor)):
            start = time.perf_counter()
            function(scores, keeps)
            timings[name].append(time.perf_counter() - start)
    grouped, single = (1000 * statistics.median(timings[n]) for n in ("grouped", "per-tensor"))
    groups = len({(tuple(s.shape), k) for s, k in zip(scores, keeps)})
    print(
        f"{len(scores)} factors in {groups} shape groups: grouped {grouped:.3f} ms, per-tensor {single:.3f} ms, "
        f"speed-up x{single / grouped:.2f}"
    )


if __name__ == "__main__":
    main()
