"""One decoding step's matrix products alone: every linear weight of smollm2-135m's shape times one row.

    python -m research.gemv [--threads 1 2]

Per dtype and thread count, the fastest of three passes over all the weights (30 layers x 7 projections and the
49,152 x 576 LM head) with ``F.linear``, ``torch.mv`` and ``(W * x).sum(-1)``, and torch's int8-weight kernel
(``torch.ops.aten._weight_int8pack_mm``, what torchao's int8 weight-only compiles to on CPU) with float32 and
bfloat16 rows; beside them the bandwidth a large ``sum`` reaches. It tells what floor a decode step of the float32,
bfloat16 and int8-weight paths has on this machine (docs/benchmarks.md, *Decode*). Random weights: the time of a
matrix product does not depend on their values.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

HIDDEN, MLP, LAYERS, VOCAB, KV = 576, 1536, 30, 49152, 192
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP)]
SHAPES = SHAPES * LAYERS + [(VOCAB, HIDDEN)]


def fastest_ms(fn, *args, passes: int = 3) -> float:
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best * 1000


def over_all(op, *columns) -> None:
    """``op`` on every weight's arguments (one column of arguments per position)."""
    for args in zip(*columns):
        op(*args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    big = torch.ones(2**28)
    print(f"sum bandwidth {big.numel() * 4 / fastest_ms(big.sum, passes=5) / 1e6:.1f} GB/s")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            weights = [torch.randn(rows, cols).to(dtype) for rows, cols in SHAPES]
            rows = [torch.ones(1, w.shape[1], dtype=dtype) for w in weights]
            size = sum(w.numel() * w.element_size() for w in weights) / 2**20
            linear = fastest_ms(over_all, F.linear, rows, weights)
            mv = fastest_ms(over_all, lambda x, w: torch.mv(w, x[0]), rows, weights)
            mul_sum = fastest_ms(over_all, lambda x, w: (w * x).sum(-1), rows, weights)
            print(
                f"{threads} threads {str(dtype):>14} ({size:.0f} MiB): linear {linear:.1f} ms, mv {mv:.1f} ms, "
                f"mul-sum {mul_sum:.1f} ms"
            )
        packed = [torch.randint(-127, 127, shape, dtype=torch.int8) for shape in SHAPES]
        for dtype in (torch.float32, torch.bfloat16):
            rows = [torch.ones(1, w.shape[1], dtype=dtype) for w in packed]
            scales = [torch.ones(w.shape[0], dtype=dtype) for w in packed]
            int8 = fastest_ms(over_all, torch.ops.aten._weight_int8pack_mm, rows, packed, scales)
            print(f"{threads} threads int8 weights x {dtype} rows: {int8:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
