"""What attending to a soft prompt costs in PyTorch's CPU attention kernel, what softprompt does instead,
and what would not help.

    .venv/bin/python -m research.attention                 # smollm2-135m's shapes: 8 rows x 64 tokens, 9/3 heads
    .venv/bin/python -m research.attention --prefix 8 --threads 2
    .venv/bin/python -m research.attention --sweep         # masked kernel vs grouped products over text lengths
    .venv/bin/python -m research.attention --decode        # one query per row (decoding), bfloat16 and float32

A prompt-tuned forward attends 64 text queries to n prefix keys plus the 64 causal text keys, which
needs an explicit mask: SDPA's ``is_causal`` aligns the causal triangle to the top left, wrong as soon
as there are more keys than queries. This times, on the same tensors, the bare model's call (64 keys,
``is_causal``) against the ways a prefix can be attended to:

* ``masked``: what transformers' SDPA function does (each key/value head copied per query head with
  ``repeat_kv``, a boolean mask over 64 + n keys);
* ``grouped (softprompt)``: what softprompt does for such short masked calls
  (`softprompt.engine.attention.grouped_attention`: two matrix products per group of query heads sharing a
  key/value head, no copies; exact);
* ``unmasked``: the same keys with no mask at all (wrong results; the kernel's floor for 64 + n keys);
* ``split``: two kernel calls, prefix keys unmasked and text keys with ``is_causal``, merged through
  their log-sum-exp (exact; needs the kernel's private entry point, which returns the log-sum-exp);
* ``padded queries``: n dummy queries in front so queries and keys have equal length and
  ``is_causal`` is right, then the dummy rows dropped (exact).

Each is checked against ``masked`` before timing. Times are the best of ``--rounds`` rounds of 10 calls.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "research"


def variants(
    batch: int, heads: int, length: int, prefix: int, head_dim: int, seed: int = 0, kv_heads: int | None = None
) -> dict:
    """``{name: zero-argument call}`` over one set of random tensors; ``bare`` has no prefix keys."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv

    from softprompt.engine.attention import grouped_attention

    kv_heads = kv_heads or heads
    group = heads // kv_heads
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, head_dim, generator=g)
    k_grouped = torch.randn(batch, kv_heads, prefix + length, head_dim, generator=g)
    v_grouped = torch.randn(batch, kv_heads, prefix + length, head_dim, generator=g)
    k, v = repeat_kv(k_grouped, group), repeat_kv(v_grouped, group)
    keys = prefix + length
    mask = torch.ones(length, keys, dtype=torch.bool).tril(diagonal=prefix)[None, None].expand(batch, 1, -1, -1)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def split():
        out_p, lse_p = flash(q, k[:, :, :prefix], v[:, :, :prefix], 0.0, False)[:2]
        out_t, lse_t = flash(q, k[:, :, prefix:], v[:, :, prefix:], 0.0, True)[:2]
        lse = torch.logaddexp(lse_p, lse_t)
        return out_p * (lse_p - lse).exp()[..., None] + out_t * (lse_t - lse).exp()[..., None]

    def padded_queries():
        padded = torch.cat([q.new_zeros(batch, heads, prefix, head_dim), q], dim=2)
        return F.scaled_dot_product_attention(padded, k, v, is_causal=True)[:, :, prefix:]

    return {
        # transformers' bare causal call: no mask, so SDPA's own grouped-query path (no repeat_kv)
        "bare (text keys only, is_causal)": lambda: F.scaled_dot_product_attention(
            q, k_grouped[:, :, prefix:], v_grouped[:, :, prefix:], is_causal=True, enable_gqa=group > 1
        ),
        "masked": lambda: F.scaled_dot_product_attention(
            q, repeat_kv(k_grouped, group), repeat_kv(v_grouped, group), attn_mask=mask
        ),
        "grouped (softprompt)": lambda: grouped_attention(q, k_grouped, v_grouped, mask),
        "unmasked": lambda: F.scaled_dot_product_attention(q, k, v),
        "split": split,
        "padded queries": padded_queries,
    }


EXACT = ("grouped (softprompt)", "split", "padded queries")


def check_exact(calls: dict) -> dict[str, float]:
    """Largest difference of each exact alternative from ``masked`` (they must agree)."""
    reference = calls["masked"]()
    return {name: float((calls[name]() - reference).abs().max()) for name in EXACT}


def best_times(calls: dict, rounds: int, per_round: int = 10) -> dict[str, float]:
    """Seconds per call: best over rounds, the calls interleaved within each round."""
    for call in calls.values():
        call()
    best = {name: float("inf") for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(per_round):
                call()
            best[name] = min(best[name], (time.perf_counter() - start) / per_round)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=9, help="query heads (smollm2-135m: 9)")
    p.add_argument("--kv-heads", type=int, default=3, help="key/value heads (smollm2-135m: 3)")
    p.add_argument("--length", type=int, default=64, help="text tokens")
    p.add_argument("--prefix", type=int, default=20, help="virtual tokens")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument(
        "--sweep", action="store_true", help="masked kernel vs grouped products for 1 and --batch rows over --lengths"
    )
    p.add_argument("--lengths", default="16,32,64,128,256", help="--sweep: text lengths (comma-separated)")
    p.add_argument(
        "--decode", action="store_true", help="one query per row: masked kernel vs grouped products, 16-bit and fp32"
    )
    args = p.parse_args(argv)
    if args.kv_heads < 1 or args.heads % args.kv_heads:
        p.error(f"--kv-heads: expected a divisor of --heads ({args.heads}), got {args.kv_heads}")

    import torch

    torch.set_num_threads(args.threads)
    if args.sweep:
        return sweep(args, [int(x) for x in args.lengths.split(",")])
    if args.decode:
        return decode(args)
    calls = variants(args.batch, args.heads, args.length, args.prefix, args.head_dim, kv_heads=args.kv_heads)
    errors = check_exact(calls)
    times = best_times(calls, args.rounds)
    bare = times["bare (text keys only, is_causal)"]
    print(
        f"SDPA on CPU, {args.threads} thread(s): {args.batch} rows x {args.heads}/{args.kv_heads} heads x "
        f"{args.length} queries, "
        f"{args.prefix} prefix keys, head_dim {args.head_dim}; torch {torch.__version__}\n"
    )
    print("| call | us per layer call | vs bare | max difference from masked |")
    print("| --- | ---: | ---: | ---: |")
    for name, t in times.items():
        err = f"{errors[name]:.1e}" if name in errors else ""
        print(f"| {name} | {t * 1e6:.0f} | {t / bare:.2f}x | {err} |")
    return 0


def sweep(args, lengths: list[int]) -> int:
    """Where grouped products stop beating the masked kernel (softprompt.engine.attention.GROUPED_MAX_QUERIES)."""
    import torch

    from softprompt.engine.attention import GROUPED_MAX_QUERIES

    print(
        f"SDPA on CPU, {args.threads} thread(s), {args.heads}/{args.kv_heads} heads, {args.prefix} prefix keys, "
        f"head_dim {args.head_dim}; torch {torch.__version__}; softprompt groups calls of up to "
        f"{GROUPED_MAX_QUERIES} queries\n"
    )
    print("| rows | text tokens | bare us | masked us | grouped us | grouped / masked |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch in sorted({1, args.batch}):
        for length in lengths:
            calls = variants(batch, args.heads, length, args.prefix, args.head_dim, kv_heads=args.kv_heads)
            calls = {k: calls[k] for k in ("bare (text keys only, is_causal)", "masked", "grouped (softprompt)")}
            t = best_times(calls, args.rounds, per_round=max(1, 2_000_000 // (batch * args.heads * length * length)))
            bare, masked, grouped = t.values()
            print(
                f"| {batch} | {length} | {bare * 1e6:.0f} | {masked * 1e6:.0f} | {grouped * 1e6:.0f} | "
                f"{grouped / masked:.2f} |"
            )
    return 0


def decode(args) -> int:
    """Decoding steps (one query per row against a cache of keys, a padding mask) in the masked kernel (what
    transformers' SDPA function does) and in grouped products, by dtype, rows and keys; which one softprompt takes
    (`softprompt.engine.attention.uses_grouped_path`)."""
    import torch

    print(
        f"Decoding attention on CPU, {args.threads} thread(s), {args.heads}/{args.kv_heads} heads, head_dim "
        f"{args.head_dim}; torch {torch.__version__}\n"
    )
    print("| dtype | rows | keys | masked us | grouped us | grouped / masked | softprompt takes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for dtype in (torch.bfloat16, torch.float32):
        for rows in (1, 2, 4, 16, 64):
            for keys in (64, 128, 256):
                t, takes = decode_call(args, dtype, rows, keys)
                name = str(dtype).removeprefix("torch.")
                print(
                    f"| {name} | {rows} | {keys} | {t['masked'] * 1e6:.0f} | {t['grouped'] * 1e6:.0f} | "
                    f"{t['grouped'] / t['masked']:.2f} | {takes} |"
                )
    return 0


def decode_call(args, dtype, rows: int, keys: int) -> tuple[dict[str, float], str]:
    """Seconds per call of both ways for one shape, and the way softprompt takes."""
    import torch

    from softprompt.engine.attention import grouped_attention, uses_grouped_path

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(rows, args.heads, 1, args.head_dim, generator=generator).to(dtype)
    k, v = (torch.randn(rows, args.kv_heads, keys, args.head_dim, generator=generator).to(dtype) for _ in "kv")
    mask = torch.rand(rows, 1, 1, keys, generator=generator) > 0.2
    mask[..., 0] = True
    groups = args.heads // args.kv_heads
    kr, vr = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = {"masked": lambda: sdpa(q, kr, vr, attn_mask=mask), "grouped": lambda: grouped_attention(q, k, v, mask)}
    return best_times(calls, args.rounds), "grouped" if uses_grouped_path(q, k, v, mask) else "masked"


if __name__ == "__main__":
    raise SystemExit(main())
