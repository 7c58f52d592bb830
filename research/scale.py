"""``python -m research.scale``: peak memory and step time of one training step on CPU, against the estimate.

Each case builds a random-weight Llama from a `transformers.LlamaConfig` (no download) in a fresh process,
adds an adapter, and runs one forward + backward + AdamW step, through `softprompt.SoftPromptModel` or, for the
``peft`` cases, through PEFT's model of the same shape and job. Measured: the growth of resident memory from
before the model is built to the step's peak (``VmHWM``, reset after imports through ``/proc/self/clear_refs``),
the weights alone (resident memory after building), and the step's wall time. Linux only.

Two allocators. With glibc's defaults (``rss``) freed tensors may stay in the process: glibc raises its mmap
threshold after large frees and then serves tensors from a heap it rarely trims. With
``MALLOC_MMAP_THRESHOLD_=65536`` (``tensors``) every tensor is its own mapping, returned on free, so the peak
is that of live tensors, the quantity the estimate models (as ``torch.cuda.max_memory_allocated`` would on a GPU).

A quantized case (``--quantize int8|nf4``) saves the random-weight base first and loads it quantized by
bitsandbytes (``softprompt.load(path, quantize=...)``; PEFT's cases through ``from_pretrained`` with the same
``BitsAndBytesConfig``). Loading has its own peak (each weight's float copy while it is quantized), reported beside
as ``load_peak_bytes``; the peak is reset after building, for every case.

Sections: ``memory`` (the estimate against measurement on several shapes, both allocators), ``quantized`` (the same
on int8/nf4 bases) and ``scale`` (issue 23's ~0.3B and ~1B shapes: plain, gradient-checkpointed, bfloat16-weight
and quantized training beside PEFT, with and without PEFT's gradient checkpointing; live tensors only).

    python -m research.scale                      # the memory section (minutes on one core): research/results/scale.json
    python -m research.scale --section quantized  # research/results/scale_quantized.json
    python -m research.scale --section scale      # the scale section, and a markdown table of it
    python -m research.scale --case 300m-prompt-ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from research.harness import hwm_kib, reset_hwm, rss_kib

# shape: hidden, layers, heads, kv heads, MLP width, vocabulary
SHAPES = {
    "20m": (256, 8, 8, 4, 688, 32000),
    "60m": (512, 8, 8, 8, 1376, 32000),
    "150m": (768, 16, 12, 4, 2048, 32000),
    "300m": (1024, 24, 16, 8, 2816, 32000),  # issue 23's ~0.3B target shape
    "1b": (2048, 22, 32, 4, 5632, 32000),  # TinyLlama-1.1B's shape
}


@dataclass(frozen=True)
class Case:
    shape: str
    method: str = "prompt_tuning"
    dtype: str = "float32"  # the frozen weights' (what a quantized base leaves unquantized)
    checkpointing: bool = False
    system: str = "softprompt"  # or "peft": PEFT's model of the same shape and job
    quantize: str = "none"  # "int8" | "nf4": the base saved, then loaded quantized by bitsandbytes


MEMORY = {
    "20m-prompt": Case("20m"),
    "60m-prompt": Case("60m"),
    "150m-prompt": Case("150m"),
    "60m-prefix": Case("60m", "prefix_tuning"),
    "150m-prompt-bf16": Case("150m", dtype="bfloat16"),
    "300m-prompt": Case("300m"),
    "300m-prompt-bf16": Case("300m", dtype="bfloat16"),
}
QUANTIZED = {
    f"{shape}-prompt-{quantize}": Case(shape, quantize=quantize)
    for shape in ("60m", "150m")
    for quantize in ("int8", "nf4")
}
SCALE = {
    f"{shape}-{name}": Case(shape, **options)
    for shape in ("300m", "1b")
    for name, options in {
        "prompt": {},
        "prompt-ckpt": {"checkpointing": True},
        "prompt-bf16": {"dtype": "bfloat16"},
        "prompt-bf16-ckpt": {"dtype": "bfloat16", "checkpointing": True},
        "prompt-int8": {"quantize": "int8"},
        "prompt-nf4": {"quantize": "nf4"},
        "peft-prompt": {"system": "peft"},
        "peft-prompt-ckpt": {"system": "peft", "checkpointing": True},
        "peft-prefix-ckpt": {"system": "peft", "method": "prefix_tuning", "checkpointing": True},
        "peft-prompt-int8": {"system": "peft", "quantize": "int8"},
        "peft-prompt-nf4": {"system": "peft", "quantize": "nf4"},
    }.items()
}
CASES = {**MEMORY, **QUANTIZED, **SCALE}
# section: its cases, the allocators each case runs under, and the results file
SECTIONS = {
    "memory": (MEMORY, ("tensors", "rss"), "scale.json"),
    "quantized": (QUANTIZED, ("tensors", "rss"), "scale_quantized.json"),
    "scale": (SCALE, ("tensors",), "scale.json"),
}
BATCH, LENGTH, TOKENS, LABEL_TOKENS = 4, 256, 20, 16
MIB = 1 << 20
ALLOCATORS = {"tensors": {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}, "rss": {}}


def reset_peak() -> None:
    """Reset the resident-set peak (VmHWM) to the current RSS: without it the figures would mean nothing."""
    if not reset_hwm():
        raise RuntimeError("cannot reset VmHWM through /proc/self/clear_refs (Linux >= 4.0 needed)")


def llama_config(shape: str):
    """The random-weight Llama of ``shape`` (a `transformers.LlamaConfig`)."""
    from transformers import LlamaConfig

    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[shape]
    return LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
    )


def estimate(case: Case):
    """`softprompt.estimate_memory` of ``case``'s job on CPU."""
    import softprompt

    return softprompt.estimate_memory(
        llama_config(case.shape),
        method=case.method,
        num_virtual_tokens=TOKENS,
        batch_size=BATCH,
        max_length=LENGTH,
        label_tokens=LABEL_TOKENS,
        dtype=case.dtype,
        quantize=case.quantize,
        gradient_checkpointing=case.checkpointing,
        device="cpu",
    )


def job_batch(vocab: int):
    """The job's batch: random token ids, labels on the last `LABEL_TOKENS` of each row."""
    import torch

    ids = torch.randint(0, vocab, (BATCH, LENGTH))
    labels = torch.full_like(ids, -100)
    labels[:, -LABEL_TOKENS:] = ids[:, -LABEL_TOKENS:]
    return ids, labels


def save_base(case: Case, folder: str) -> None:
    """A quantized case's float checkpoint (and a one-word tokenizer: the step feeds token ids, so any will do)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    LlamaForCausalLM(llama_config(case.shape)).save_pretrained(folder)
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)


def _base(case: Case, folder: str | None):
    """The frozen base: built in its dtype (never a float32 copy first), or loaded quantized from ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    import softprompt
    from softprompt.models.loading import quantization_config

    if case.quantize == "none":
        torch.set_default_dtype(getattr(torch, case.dtype))
        try:
            return LlamaForCausalLM(llama_config(case.shape))
        finally:
            torch.set_default_dtype(torch.float32)
    if case.system == "softprompt":
        base = softprompt.load(folder, quantize=case.quantize).base
    else:  # as PEFT's users load a quantized base
        base = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quantization_config(case.quantize), device_map={"": "cpu"}
        )
    # transformers leaves the unquantized weights (embeddings, norms, LM head) as views of the checkpoint's memory
    # mapping, which then keeps every page of the float32 checkpoint it read resident (file pages, not tensors).
    # Own copies close the mapping, so resident memory counts live tensors, as for the in-memory bases.
    with torch.no_grad():
        for param in base.parameters():
            if param.dtype.is_floating_point:
                param.data = param.data.clone()
    return base


def build(case: Case, folder: str | None = None):
    """``case``'s model ready for one step: ``(loss_fn, trainable parameters, frozen base)``, where ``loss_fn(ids, labels)`` is
    the job's loss; a quantized case loads its base from ``folder`` (`save_base`). PEFT's refusals raise
    ``ValueError``."""
    import softprompt

    base = _base(case, folder)
    if case.system == "peft":
        from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

        if case.checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        kind = PromptTuningConfig if case.method == "prompt_tuning" else PrefixTuningConfig
        model = get_peft_model(base, kind(task_type="CAUSAL_LM", num_virtual_tokens=TOKENS))
        model.train()  # transformers checkpoints in train mode only; a Llama has no dropout, so the numbers are eval's
        params = [p for p in model.parameters() if p.requires_grad]
        return (lambda ids, labels: model(input_ids=ids, labels=labels).loss), params, base
    sp = softprompt.SoftPromptModel(base, gradient_checkpointing=case.checkpointing)
    params = list(sp.add_adapter("a", method=case.method, num_virtual_tokens=TOKENS, init="random").parameters())
    sp.train()
    return (lambda ids, labels: sp(ids, adapters="a", labels=labels).loss), params, base


def measure(name: str) -> dict:
    """One case in this process: measured and estimated bytes, and the step's seconds."""
    import gc
    import tempfile

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    case = CASES[name]
    if case.system == "peft":
        import peft  # noqa: F401  (imported before the baseline: its import is not the model's memory)
    if case.quantize != "none":
        import bitsandbytes  # noqa: F401  (as peft)
    predicted = estimate(case)
    ids, labels = job_batch(SHAPES[case.shape][-1])
    result = {"case": name, **asdict(case), "parameters": predicted.parameters, "estimate": predicted.to_dict()}
    result["shape_name"] = case.shape
    result["shape"] = dict(zip(("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"), SHAPES[case.shape]))
    with tempfile.TemporaryDirectory() as folder:
        if case.quantize != "none":
            save_base(case, folder)  # freed before the baseline below
        gc.collect()
        reset_peak()
        start = rss_kib() * 1024
        try:
            loss_fn, params, _ = build(case, folder)
        except ValueError as refused:  # PEFT refuses checkpointing for prefix tuning
            return {**result, "refused": str(refused)}
    # Loading has its own peak (a quantized base: each weight's float copy while it is quantized), reported
    # beside; the step's peak is measured from here (or is the loaded model, if higher).
    load_peak = hwm_kib() * 1024
    gc.collect()
    built = rss_kib() * 1024
    reset_peak()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    started = time.perf_counter()
    loss_fn(ids, labels).backward()
    optimizer.step()
    seconds = time.perf_counter() - started
    peak = hwm_kib() * 1024
    return {
        **result,
        "measured": {"weights_bytes": built - start, "total_bytes": peak - start, "load_peak_bytes": load_peak - start},
        "step_seconds": seconds,
    }


def _line(row: dict, allocator: str) -> str:
    if "refused" in row:
        return f"{row['case']:<22} refused: {row['refused']}"
    est, got = row["estimate"], row["measured"][allocator]
    return (
        f"{row['case']:<22} {allocator:<7} {row['parameters'] / 1e6:6.1f}M  "
        f"weights {got['weights_bytes'] / MIB:7.1f} MiB (est {est['weights_bytes'] / MIB:7.1f})  "
        f"peak {got['total_bytes'] / MIB:7.1f} MiB "
        f"(est {est['total_bytes'] / MIB:7.1f}, {est['total_bytes'] / got['total_bytes'] - 1:+.1%})  "
        f"step {row['step_seconds'][allocator]:6.1f} s  load peak {got['load_peak_bytes'] / MIB:7.1f} MiB"
    )


def markdown(rows: list[dict]) -> str:
    """The scale section's table: each case's peak (live tensors) and step time, the estimate, and the ratios
    issue 23's targets name (checkpointed / plain, bfloat16 / float32, on the same shape and system)."""
    by_case = {row["case"]: row for row in rows}
    lines = [
        "| case | system | weights | checkpointing | peak MiB | step s | estimate MiB (error) | vs plain float32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "refused" in row:
            lines.append(
                f"| {row['case']} | {row['system']} {row['method']} | {row['dtype']} | yes | refused: "
                f"`{row['refused']}` | | | |"
            )
            continue
        peak = row["measured"]["tensors"]["total_bytes"]
        estimate = row["estimate"]["total_bytes"]
        plain = by_case.get(f"{row['shape_name']}-{'peft-' if row['system'] == 'peft' else ''}prompt")
        ratio = f"{peak / plain['measured']['tensors']['total_bytes']:.2f}x" if plain and plain is not row else ""
        error = f"{estimate / MIB:.0f} ({estimate / peak - 1:+.1%})" if row["system"] == "softprompt" else "n/a"
        weights = row["dtype"] if row.get("quantize", "none") == "none" else row["quantize"]
        lines.append(
            f"| {row['case']} | {row['system']} | {weights} | {'yes' if row['checkpointing'] else 'no'} | "
            f"{peak / MIB:.0f} | {row['step_seconds']['tensors']:.1f} | {error} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=sorted(SECTIONS), default="memory", help="The cases to run.")
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="Run only these cases.")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_process:
        print(json.dumps(measure(args.case[0])))
        return 0
    rows, files = [], {}
    for case in args.case or SECTIONS[args.section][0]:
        row: dict = {}
        # a case of both sections (300m-prompt) runs as the chosen section's
        section = next(s for s in (args.section, *SECTIONS) if case in SECTIONS[s][0])
        files[case] = SECTIONS[section][2]
        for allocator in SECTIONS[section][1]:
            out = subprocess.run(
                [sys.executable, "-m", "research.scale", "--in-process", "--case", case],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, **ALLOCATORS[allocator]},
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if "refused" not in result:
                result["measured"] = {**row.get("measured", {}), allocator: result["measured"]}
                result["step_seconds"] = {**row.get("step_seconds", {}), allocator: result["step_seconds"]}
            row = result
            print(_line(row, allocator), flush=True)
            if "refused" in row:
                break
        rows.append(row)
    order = list(CASES)
    for file in set(files.values()):
        path = Path(__file__).parent / "results" / file
        path.parent.mkdir(exist_ok=True)
        ran = [row for row in rows if files[row["case"]] == file]
        # earlier results of the cases not run now are kept
        kept = [r for r in (json.loads(path.read_text()) if path.exists() else []) if r["case"] not in files]
        path.write_text(json.dumps(sorted(kept + ran, key=lambda r: order.index(r["case"])), indent=2))
    if any(r["case"] in SCALE for r in rows):
        print(markdown([r for r in rows if r["case"] in SCALE]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
