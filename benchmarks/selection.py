"""Where the schedule's bookkeeping could shrink: mask selection by ``topk`` against a ``kthvalue`` threshold, and the
importance update eager against ``torch.compile``-fused, at a model's real factor shapes. Same inputs, interleaved,
medians; a variant is worth keeping only if it is faster *and* selects the same masks.

    python benchmarks/selection.py --preset llama3-8b --rank 16     # one decoder layer's seven projections
    python benchmarks/selection.py --preset cpu                      # the small model of benchmarks/train_step.py

Variants:

- selection ``topk`` (what ``sparsity.row_topk_masks`` does: same-shaped rows stacked, one ``topk`` + ``scatter``);
- selection ``kthvalue``: per row the ``(n - k + 1)``-th smallest score as a threshold, ``scores >= threshold``
  (one ``kthvalue`` + one comparison; keeps more than ``k`` entries when the threshold value is tied, so it is exact
  only without ties);
- importance eager (``sparsity.update_importance_emas``: ``torch._foreach_*`` kernels, one finiteness check);
- importance compiled: the same arithmetic through ``torch.compile`` (fused loops), without the finiteness check;
- finiteness check: ``sparsity.all_finite`` (a ``foreach`` 2-norm; the exact max-norm only if that is not finite)
  against a ``foreach`` max-norm alone (what it replaced).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import PRESETS  # noqa: E402

from peft_roselora import sparsity  # noqa: E402


def factor_shapes(args) -> list[tuple[int, int]]:
    """``(rows, n)`` of the scores: ``(r, in)`` per ``lora_A`` and ``(r, out)`` per column set of ``lora_B``."""
    hidden, intermediate = args.hidden, args.intermediate
    kv = hidden * (args.kv_heads or args.heads) // args.heads
    # (in, out) of q, k, v, o, gate, up, down
    projections = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)]
    projections += [(hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]
    shapes = []
    for in_features, out_features in projections * args.layers:
        shapes += [(args.rank, in_features), (args.rank, out_features)]
    return shapes


def select_topk(scores, keeps):
    return sparsity.row_topk_masks(scores, keeps)


def select_kthvalue(scores, keeps):
    masks = []
    for score, keep in zip(scores, keeps):
        threshold = score.kthvalue(score.shape[1] - keep + 1, dim=1, keepdim=True).values
        masks.append(score >= threshold)
    return masks


def importance_eager(emas, weights, grads, beta):
    return sparsity.update_importance_emas(emas, weights, grads, beta)


def _importance_math(emas, weights, grads, beta: float):
    return [beta * ema + (1.0 - beta) * (weight * grad).abs() for ema, weight, grad in zip(emas, weights, grads)]


def timed(function, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--keep-ratio", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.kv_heads = PRESETS[args.preset].get("kv_heads")

    generator = torch.Generator().manual_seed(0)
    shapes = factor_shapes(args)
    scores = [torch.rand(shape, generator=generator) for shape in shapes]
    keeps = [sparsity.kept_count(args.keep_ratio, shape[1]) for shape in shapes]
    weights = [torch.randn(shape, generator=generator) for shape in shapes]
    grads = [torch.randn(shape, generator=generator) for shape in shapes]
    emas = [torch.rand(shape, generator=generator) for shape in shapes]

    same = all(torch.equal(a, b) for a, b in zip(select_topk(scores, keeps), select_kthvalue(scores, keeps)))
    variants = {
        "selection topk": lambda: select_topk(scores, keeps),
        "selection kthvalue": lambda: select_kthvalue(scores, keeps),
        "importance eager": lambda: importance_eager([e.clone() for e in emas], weights, grads, 0.85),
        # the finiteness check run twice per step (importance, masking): what sparsity.all_finite does (a 2-norm,
        # exact max-norm only when that is not finite) against the max-norm it replaced
        "finite 2-norm first": lambda: sparsity.all_finite(weights),
        "finite max-norm": lambda: bool(torch.stack(torch._foreach_norm(weights, float("inf"))).isfinite().all()),
    }
    clone_cost = lambda: [e.clone() for e in emas]  # noqa: E731  (subtracted: the eager variant updates in place)
    if not args.no_compile:
        compiled = torch.compile(_importance_math, dynamic=False)
        compiled(emas, weights, grads, 0.85)  # compile once, outside the timing
        variants["importance compiled"] = lambda: compiled(emas, weights, grads, 0.85)
    samples = {name: [] for name in variants}
    samples["clone"] = []
    for _ in range(args.rounds):
        for name, function in variants.items():
            samples[name] += timed(function, args.repeats)
        samples["clone"] += timed(clone_cost, args.repeats)
    medians = {name: 1000 * statistics.median(values) for name, values in samples.items()}
    medians["importance eager"] -= medians["clone"]
    entries = sum(a * b for a, b in shapes)
    print(
        f"{args.preset}: {len(shapes) // 2} modules, rank {args.rank}, {entries / 1e6:.2f} M factor entries, "
        f"keep ratio {args.keep_ratio}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for name in variants:
        print(f"{name:<22} {medians[name]:>9.3f} ms")
    print(f"kthvalue selects the same masks as topk: {same}")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(
                {"preset": args.preset, "rank": args.rank, "keep_ratio": args.keep_ratio, "modules": len(shapes) // 2,
                 "median_ms": medians, "kthvalue_same_masks": same, "torch": torch.__version__},
                handle,
                indent=2,
            )  # fmt: skip


if __name__ == "__main__":
    main()
