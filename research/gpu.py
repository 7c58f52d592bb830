"""``python -m research.gpu``: the GPU benchmark of ``scripts/gpu_check.sh`` (needs CUDA; never run in CI).

On a random-weight Llama-3-8B shape in bfloat16 on one GPU (no download: the model is built from a
`transformers.LlamaConfig`):

* **training**: one optimizer step of a 20-token prompt-tuning adapter at batch 8 x 512 tokens (loss on the
  last 16 tokens of each row), softprompt beside PEFT's prompt tuning on the same base, each with and
  without gradient checkpointing: the median step time of a few steps after a warm-up, and the peak of
  ``torch.cuda.max_memory_allocated`` over them, with `softprompt.estimate_memory`'s prediction beside;
* **generation**: greedy decoding throughput (new tokens per second) at batch 64 through the decoding
  primitives (`SoftPromptModel.prefill` / `advance`), every row naming one adapter, and rows spread over 8
  adapters in one mixed batch;
* **decode** (issue 27): one stream, 64 greedy tokens after a 32-token prompt, per-step median and p99 of
  softprompt's decode modes (eager, static, compiled: CUDA graphs) beside transformers' eager and static-cache
  compiled ``generate``, each against one read of the weights at the bandwidth a large ``sum`` reaches on the
  card (issue 27's target: a step within 1.3x of it). ``--part decode`` runs this part alone.

Public API only. Writes one JSON file (``--out``); ``--layers`` shrinks the model for a quick try.

    python -m research.gpu --out gpu_bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

#: Llama-3-8B's shape (meta-llama/Meta-Llama-3-8B config.json).
LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)
BATCH, LENGTH, TOKENS, LABEL_TOKENS = 8, 512, 20, 16
GEN_BATCH, GEN_PROMPT, GEN_NEW, GEN_ADAPTERS = 64, 128, 64, 8
DECODE_PROMPT, DECODE_NEW = 32, 64
PARTS = ("training", "generation", "decode")


def training_batch(vocab: int, batch: int, length: int, label_tokens: int, seed: int = 0):
    """Random token ids ``[batch, length]`` and labels carrying loss on the last ``label_tokens`` of each row."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    labels = torch.full_like(ids, -100)
    labels[:, -label_tokens:] = ids[:, -label_tokens:]
    return ids, labels


def mixed_names(rows: int, adapters: int) -> list[str]:
    """Row i names adapter ``a{i % adapters}``: every adapter in every stretch of ``adapters`` rows."""
    return [f"a{i % adapters}" for i in range(rows)]


def timed(step: Callable[[], object], repeats: int = 3) -> dict:
    """Median seconds of ``step`` over ``repeats`` runs after one warm-up, and the peak allocated bytes."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return {"step_s": statistics.median(seconds), "peak_bytes": torch.cuda.max_memory_allocated()}


def build_base(layers: int | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA3_8B, **({"num_hidden_layers": layers} if layers else {})})
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bfloat16 on the GPU: never a float32 copy
    try:
        with torch.device("cuda"):
            base = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    return base.eval().requires_grad_(False)


def softprompt_training(base, checkpointing: bool) -> dict:
    import softprompt

    model = softprompt.SoftPromptModel(base)
    if checkpointing and not hasattr(softprompt.SoftPromptModel, "gradient_checkpointing"):
        return {"skipped": "this softprompt has no gradient checkpointing"}
    if checkpointing:
        model.gradient_checkpointing = True
    adapter = model.add_adapter("a", method="prompt_tuning", num_virtual_tokens=TOKENS, init="random")
    model.train()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    ids, labels = (t.cuda() for t in training_batch(base.config.vocab_size, BATCH, LENGTH, LABEL_TOKENS))

    def step():
        model(ids, adapters="a", labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        return timed(step)
    finally:
        model.remove_adapter("a")
        if checkpointing:
            model.gradient_checkpointing = False


def peft_training(base, checkpointing: bool) -> dict:
    from peft import PromptTuningConfig, get_peft_model

    if checkpointing:  # non-reentrant: the frozen inputs need no gradient
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=TOKENS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ids, labels = (t.cuda() for t in training_batch(base.config.vocab_size, BATCH, LENGTH, LABEL_TOKENS))

    def step():
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        return timed(step)
    except torch.OutOfMemoryError as exc:
        return {"skipped": f"out of memory: {str(exc).splitlines()[0]}"}
    finally:
        # PEFT wraps the base without changing its modules, but hooks its embeddings to output tensors that
        # require gradients (for checkpointing): undo that and checkpointing for what runs next.
        base.disable_input_require_grads()
        base.gradient_checkpointing_disable()
        base.eval().requires_grad_(False)


def generation(base, names: list[str]) -> dict:
    """Greedy decoding of ``GEN_NEW`` tokens after ``GEN_PROMPT``-token prompts, one adapter name per row."""
    import softprompt

    model = softprompt.SoftPromptModel(base).eval()
    for i, name in enumerate(dict.fromkeys(names)):
        model.add_adapter(name, method="prompt_tuning", num_virtual_tokens=TOKENS, init="random", seed=i)
    ids, _ = training_batch(base.config.vocab_size, len(names), GEN_PROMPT, 1, seed=1)
    mask = torch.ones_like(ids)

    def decode():
        state = model.prefill(ids, mask, names)
        token = state.logits.argmax(-1, keepdim=True)
        for _ in range(GEN_NEW - 1):
            token = model.advance(state, token)[:, -1].argmax(-1, keepdim=True)

    result = timed(decode, repeats=2)
    return {**result, "tokens_per_s": len(names) * GEN_NEW / result["step_s"], "adapters": len(set(names))}


def decode_table(
    base,
    modes: tuple[str, ...] = ("eager", "static", "compiled"),
    new_tokens: int = DECODE_NEW,
    repeats: int = 3,
    transformers_compiled: bool = True,
    bandwidth_gib: float = 2.0,
) -> dict:
    """One stream's per-step latency for each decode mode and transformers' generate (see the module docstring)."""
    import softprompt
    from research import decode as bench

    device = str(base.device)
    model = softprompt.SoftPromptModel(base).eval()
    ids, _ = training_batch(base.config.vocab_size, 1, DECODE_PROMPT, 1, seed=2)
    ids = ids.to(device)
    mask = torch.ones_like(ids)

    def in_mode(mode: str):
        call = bench.softprompt_call(model, ids, mask, None, new_tokens)

        def run(stamp) -> None:
            model.decode = mode
            call(stamp)

        return run

    calls = {f"softprompt {mode}": in_mode(mode) for mode in modes}
    calls["transformers generate"] = bench.transformers_call(base, ids, mask, 0, new_tokens)
    if transformers_compiled:
        calls["transformers generate static+compile"] = bench.compiled_generate(base, ids, mask, 0, new_tokens)
    read_s = bench.weight_bytes(base) / bench.memory_bandwidth(bandwidth_gib, device=device)
    rows = {}
    for name, call in calls.items():
        bench.timed(call, 1, new_tokens)  # warm-up: compiles, CUDA graphs recorded
        steps = sorted(s for _ in range(repeats) for s in bench.timed(call, 1, new_tokens)["steps_s"])
        median = statistics.median(steps)
        rows[name] = {
            "per_token_ms_median": median * 1000,
            "per_token_ms_p99": steps[min(len(steps) - 1, round(0.99 * (len(steps) - 1)))] * 1000,
            "over_weights_read": median / read_s,
        }
        print(f"  decode {name}: {rows[name]}", flush=True)
    return {"prompt_tokens": DECODE_PROMPT, "new_tokens": new_tokens, "weights_read_ms": read_s * 1000, "rows": rows}


def estimate(checkpointing: bool, layers: int | None) -> int:
    from transformers import LlamaConfig

    import softprompt

    config = LlamaConfig(**{**LLAMA3_8B, **({"num_hidden_layers": layers} if layers else {})})
    return softprompt.estimate_memory(
        config,
        num_virtual_tokens=TOKENS,
        batch_size=BATCH,
        max_length=LENGTH,
        label_tokens=LABEL_TOKENS,
        dtype="bfloat16",
        gradient_checkpointing=checkpointing,
        device="cuda",
    ).total_bytes


def run(layers: int | None = None, parts: tuple[str, ...] = PARTS) -> dict:
    import peft
    import transformers

    import softprompt

    base = build_base(layers)
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "softprompt": softprompt.__version__,
        },
        "shape": {**LLAMA3_8B, "num_hidden_layers": base.config.num_hidden_layers},
        "parameters": sum(p.numel() for p in base.parameters()),
        "training": {"batch": BATCH, "length": LENGTH, "virtual_tokens": TOKENS, "label_tokens": LABEL_TOKENS},
        "generation": {"batch": GEN_BATCH, "prompt_tokens": GEN_PROMPT, "new_tokens": GEN_NEW},
    }
    for checkpointing in (False, True) if "training" in parts else ():
        key = "checkpointing" if checkpointing else "plain"
        results["training"][f"softprompt_{key}"] = {
            **softprompt_training(base, checkpointing),
            "estimate_bytes": estimate(checkpointing, layers),
        }
        results["training"][f"peft_{key}"] = peft_training(base, checkpointing)
        print(json.dumps({key: results["training"]}, indent=1), flush=True)
    if "generation" in parts:
        results["generation"]["one_adapter"] = generation(base, ["a0"] * GEN_BATCH)
        results["generation"]["mixed"] = generation(base, mixed_names(GEN_BATCH, GEN_ADAPTERS))
    if "decode" in parts:
        results["decode"] = decode_table(base)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write.")
    parser.add_argument("--layers", type=int, help="Decoder layers (default 32, Llama-3-8B's); fewer for a quick try.")
    parser.add_argument(
        "--part", choices=PARTS, action="append", help="Run only these parts (default: all; repeatable)."
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("research.gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    results = run(args.layers, tuple(args.part or PARTS))
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
