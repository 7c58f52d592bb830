"""``python -m research.scale_quantized``: `softprompt.estimate_memory` against the measured peak of one training step
on a quantized base (``--quantize int8|nf4``), on CPU.

As ``research.scale`` (its shapes, job and allocators), except that the base goes through ``softprompt.load(path,
quantize=...)``: a random-weight Llama (and a one-word tokenizer) is saved first, then loaded quantized by
bitsandbytes. Loading has its own
peak (the checkpoint's pages and each weight's float copy while it is quantized), so the peak is reset after
loading: the measured total is the growth of resident memory from before loading to the peak of the training step
(or to the loaded model, if higher). The load's own peak (file pages of the checkpoint included) is reported beside
it. Linux only.

    python -m research.scale_quantized                 # every case: a table, research/results/scale_quantized.json
    python -m research.scale_quantized --case 60m-prompt-nf4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from research.harness import hwm_kib, rss_kib
from research.scale import ALLOCATORS, BATCH, LABEL_TOKENS, LENGTH, MIB, SHAPES, TOKENS, reset_peak

# name: shape, quantization (prompt tuning, float32 for what stays unquantized)
CASES = {
    "60m-prompt-int8": ("60m", "int8"),
    "60m-prompt-nf4": ("60m", "nf4"),
    "150m-prompt-int8": ("150m", "int8"),
    "150m-prompt-nf4": ("150m", "nf4"),
}


def measure(case: str) -> dict:
    """One case in this process: measured and estimated bytes."""
    import bitsandbytes  # noqa: F401  (imported before the baseline: its libraries are not the model's memory)
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import softprompt

    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape, quantize = CASES[case]
    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
    )
    estimate = softprompt.estimate_memory(
        config,
        num_virtual_tokens=TOKENS,
        batch_size=BATCH,
        max_length=LENGTH,
        label_tokens=LABEL_TOKENS,
        quantize=quantize,
        device="cpu",
    )
    ids = torch.randint(0, vocab, (BATCH, LENGTH))
    labels = torch.full_like(ids, -100)
    labels[:, -LABEL_TOKENS:] = ids[:, -LABEL_TOKENS:]
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(config).save_pretrained(folder)  # freed before the baseline below
        # softprompt.load wants a tokenizer beside the weights; the step feeds token ids, so any will do
        tokenizer = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)
        reset_peak()
        start = rss_kib() * 1024
        model = softprompt.load(folder, quantize=quantize)
    load_peak = hwm_kib() * 1024
    # transformers leaves the unquantized weights (embeddings, norms, LM head) as views of the checkpoint's memory
    # mapping, which then keeps every page of the float32 checkpoint it read resident (file pages, not tensors).
    # Own copies close the mapping, so resident memory counts live tensors, as for research.scale's in-memory bases.
    with torch.no_grad():
        for param in model.base.parameters():
            if param.dtype.is_floating_point:
                param.data = param.data.clone()
    gc.collect()
    loaded = rss_kib() * 1024
    reset_peak()
    adapter = model.add_adapter("a", num_virtual_tokens=TOKENS, init="random")
    model.train()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    model(ids, adapters="a", labels=labels).loss.backward()
    optimizer.step()
    peak = hwm_kib() * 1024
    return {
        "case": case,
        "shape": dict(zip(("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"), SHAPES[shape])),
        "quantize": quantize,
        "parameters": estimate.parameters,
        "measured": {
            "weights_bytes": loaded - start,
            "total_bytes": peak - start,
            "load_peak_bytes": load_peak - start,
        },
        "estimate": estimate.to_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="Run only these cases.")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_process:
        print(json.dumps(measure(args.case[0])))
        return 0
    rows = []
    for case in args.case or CASES:
        row: dict = {}
        for allocator, env in ALLOCATORS.items():
            out = subprocess.run(
                [sys.executable, "-m", "research.scale_quantized", "--in-process", "--case", case],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, **env},
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            row = {**result, "measured": {**row.get("measured", {}), allocator: result["measured"]}}
            est, got = row["estimate"], result["measured"]
            print(
                f"{case:<17} {allocator:<7} {row['parameters'] / 1e6:6.1f}M  "
                f"weights {got['weights_bytes'] / MIB:7.1f} MiB (est {est['weights_bytes'] / MIB:7.1f})  "
                f"peak {got['total_bytes'] / MIB:7.1f} MiB "
                f"(est {est['total_bytes'] / MIB:7.1f}, {est['total_bytes'] / got['total_bytes'] - 1:+.1%})  "
                f"load peak {got['load_peak_bytes'] / MIB:7.1f} MiB",
                flush=True,
            )
        rows.append(row)
    path = Path(__file__).parent / "results" / "scale_quantized.json"
    path.parent.mkdir(exist_ok=True)
    ran = {row["case"] for row in rows}  # earlier results of the cases not run now are kept
    kept = [r for r in (json.loads(path.read_text()) if path.exists() else []) if r["case"] not in ran]
    order = list(CASES)
    path.write_text(json.dumps(sorted(kept + rows, key=lambda r: order.index(r["case"])), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
