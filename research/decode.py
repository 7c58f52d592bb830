"""Section `decode`: greedy decoding speed by number of streams, softprompt beside transformers and llama.cpp.

Every system decodes the same prompt, repeated once per stream, for exactly ``new_tokens`` greedy tokens (no
end-of-sequence stop). Per call: aggregate tokens/s (streams x new tokens / wall time, prefill included), the
first token's latency (call start to the first token) and the per-token latency (time between one step's tokens
and the next's), median and p99 over all steps of the timed calls. Systems, each where it is available:

- softprompt ``eager`` (float32), ``static`` and ``compiled`` (the decode modes, when `softprompt.load` takes
  ``decode``), ``bf16`` (``dtype="bfloat16"``, eager and compiled), ``int8-weight`` (``quantize="int8-weight"``,
  torchao: on the float32 base, eager, and on the bfloat16 base, compiled) and bitsandbytes' ``int8`` (LLM.int8()),
  in load's default decode mode unless named; a compiled system warms up (compiles) at every stream count;
- transformers' ``generate`` on the same float32 base (eager, dynamic cache); its static-cache compiled
  ``generate`` at one stream (a compile per batch shape would take minutes each on this machine);
- llama.cpp through llama-cpp-python on the Q4_1 GGUF the built-in model is converted from, one stream (its
  Python API decodes one sequence at a time), with the same number of threads;
- mixed adapters: 16 streams each with its own prompt-tuning adapter against 16 streams sharing one;
- the float32 weights' read time: their bytes over the memory bandwidth a large-tensor sum measures in this run.

Systems alternate within each repeat (rotated, as `research.harness.interleaved` does), so a slow spell of a
shared machine hits them alike; each warms up once, at the first stream count.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import softprompt
from softprompt.engine.generation import GenerationConfig, generate_batch
from softprompt.engine.tokens import encode_texts, pad_id

from . import harness
from .inference import no_eos

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. Once upon a time,"
DECODE_MODES = ("eager", "static", "compiled")

#: (name, what softprompt.load takes beyond the model) of softprompt's systems; decode modes are added when known.
PRECISIONS = (
    ("bf16", {"dtype": "bfloat16"}),
    ("bf16 compiled", {"dtype": "bfloat16", "decode": "compiled"}),
    ("int8-weight", {"quantize": "int8-weight"}),  # float32 activations
    # int8 weights times bfloat16 activations: the CPU int8-weight kernel's fast case, compiled
    ("int8-weight bf16 compiled", {"dtype": "bfloat16", "quantize": "int8-weight", "decode": "compiled"}),
    ("int8 bitsandbytes", {"quantize": "int8"}),  # the other int8 candidate: why int8-weight is torchao's
)


def decode_modes() -> tuple[str, ...]:
    """The decode modes `softprompt.load` takes (its ``decode`` keyword), or only eager where it has none."""
    return DECODE_MODES if "decode" in inspect.signature(softprompt.load).parameters else ("eager",)


# ------------------------------------------------------------------------------------------ one call
def timed(call: Callable[[Callable[[], None]], None], streams: int, new_tokens: int) -> dict:
    """Run ``call(stamp)``, which calls ``stamp()`` once per decoding step as its tokens appear."""
    stamps: list[float] = []
    start = time.perf_counter()
    call(lambda: stamps.append(time.perf_counter()))
    end = time.perf_counter()
    if len(stamps) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} steps, saw {len(stamps)}")
    return {
        "seconds": end - start,
        "tokens_per_s": streams * new_tokens / (end - start),
        "first_token_s": stamps[0] - start,
        "steps_s": [b - a for a, b in zip(stamps, stamps[1:])],
    }


def softprompt_call(model, ids, mask, adapters, new_tokens: int):
    def call(stamp):
        # on_token runs once per row per step: stamp the step at its first row's token.
        with no_eos(model):
            generate_batch(
                model,
                ids,
                mask,
                adapters,
                GenerationConfig(max_new_tokens=new_tokens),
                on_token=lambda row, _token: stamp() if row == 0 else None,
            )

    return call


class _Stamps:
    """A transformers streamer that stamps each step (its first `put` is the prompt)."""

    def __init__(self, stamp):
        self.stamp, self.prompt_seen = stamp, False

    def put(self, _value) -> None:
        if self.prompt_seen:
            self.stamp()
        self.prompt_seen = True

    def end(self) -> None:
        pass


def transformers_call(base, ids, mask, pad: int, new_tokens: int, **generate_options):
    def call(stamp):
        with torch.no_grad():
            base.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                streamer=_Stamps(stamp),
                **generate_options,
            )

    return call


def llama_cpp_call(llm, tokens: list[int], new_tokens: int):
    def call(stamp):
        llm.reset()
        for i, _token in enumerate(llm.generate(tokens, top_k=1, temp=0.0, reset=True)):
            stamp()
            if i + 1 == new_tokens:
                break

    return call


# ------------------------------------------------------------------------------------------ systems
def gguf_path(model: str) -> Path | None:
    """The GGUF file a built-in model was converted from (in softprompt's package cache), if it is there."""
    from softprompt.models.builtin import BUILTIN_MODELS, packages_dir

    spec = BUILTIN_MODELS.get(model)
    if spec is None:
        return None
    found = list(packages_dir(model).rglob(spec.gguf_file))
    return found[0] if found else None


def load_llama_cpp(model: str, threads: int, log) -> tuple[object | None, str]:
    """A llama-cpp-python model on the built-in model's GGUF, or None and why not."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None, "llama-cpp-python is not installed (pip install 'softprompt[bench]')"
    path = gguf_path(model)
    if path is None:
        return None, f"no GGUF for {model} in softprompt's package cache"
    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    log(f"  llama.cpp: {path.name}, {threads} threads")
    return llm, str(path)


def memory_bandwidth(gib: float = 1.0, repeats: int = 5, device: str = "cpu") -> float:
    """Bytes per second that ``tensor.sum()`` reads from a tensor far larger than the caches on ``device`` (best
    of repeats; a CUDA device is synchronised around each)."""
    x = torch.ones(int(gib * 2**30) // 4, device=device)
    cuda = x.device.type == "cuda"
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        x.sum()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct parameter storages (a tied LM head counts once)."""
    seen: dict[int, int] = {}
    for p in module.parameters():
        seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(seen.values())


# ------------------------------------------------------------------------------------------ the section
def run(
    source: str,
    *,
    model: str,
    streams=(1, 4, 16, 64),
    new_tokens: int = 64,
    repeats: int,
    warmup: int,
    threads: int,
    llama_cpp: bool = True,
    compiled: bool = True,
    precisions=PRECISIONS,
    mixed_streams: int = 16,
    log=print,
) -> dict:
    """The decode table (see the module docstring): one row per system, a column per stream count."""
    loaded: dict[str, softprompt.SoftPromptModel] = {}
    modes = decode_modes()
    na = {f"softprompt {m}": "softprompt.load has no decode keyword here" for m in DECODE_MODES if m not in modes}
    if not compiled and "compiled" in modes:
        modes = tuple(m for m in modes if m != "compiled")
        na["softprompt compiled"] = "left out (--no-compile, or quick mode)"
    for mode in modes:
        options = {"decode": mode} if "decode" in inspect.signature(softprompt.load).parameters else {}
        loaded[mode] = softprompt.load(source, **options)
    for name, options in precisions:
        if options.get("decode") == "compiled" and not compiled:
            na[f"softprompt {name}"] = "left out (--no-compile, or quick mode)"
            continue
        try:
            model_ = softprompt.load(source, **options)
            # Labelled with the decode mode they run (load's default unless named), where softprompt has modes.
            named = "decode" in options or not hasattr(model_, "decode")
            loaded[name if named else f"{name} ({model_.decode})"] = model_
        except softprompt.SoftPromptError as exc:
            log(f"  {name}: n/a ({exc})")
            na[f"softprompt {name}"] = str(exc)
    eager = loaded["eager"]
    tokenizer, base = eager.tokenizer, eager.base
    pad = pad_id(tokenizer)
    llm, llm_note = load_llama_cpp(model, threads, log) if llama_cpp else (None, "left out in quick mode")
    if llm is None:
        na["llama.cpp Q4_1"] = llm_note
    prompt_tokens = tokenizer(PROMPT)["input_ids"]
    result: dict = {"prompt_tokens": len(prompt_tokens), "new_tokens": new_tokens, "streams": list(streams)}
    rows: dict[str, dict] = {}

    def record(name: str, n: int, runs: list[dict]) -> None:
        steps = sorted(s for r in runs for s in r["steps_s"])
        cell = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "first_token_ms": statistics.median(r["first_token_s"] for r in runs) * 1000,
            "per_token_ms_median": statistics.median(steps) * 1000,
            "per_token_ms_p99": steps[min(len(steps) - 1, round(0.99 * (len(steps) - 1)))] * 1000,
            "runs_tokens_per_s": [r["tokens_per_s"] for r in runs],
        }
        rows.setdefault(name, {})[str(n)] = cell
        log(
            f"  {name:>24} x{n:<3} {cell['tokens_per_s']:8.1f} tok/s  first {cell['first_token_ms']:7.1f} ms  "
            f"per token {cell['per_token_ms_median']:6.1f} ms (p99 {cell['per_token_ms_p99']:6.1f})"
        )

    for n in streams:
        ids, mask = encode_texts(tokenizer, [PROMPT] * n, side="left")
        calls = {
            f"softprompt {key}": softprompt_call(model_, ids, mask, None, new_tokens) for key, model_ in loaded.items()
        }
        calls["transformers generate"] = transformers_call(base, ids, mask, pad, new_tokens)
        if n == 1 and llm is not None:
            calls["llama.cpp Q4_1"] = llama_cpp_call(llm, prompt_tokens, new_tokens)
        # Warm-up once per system, at the first stream count: later counts reuse its kernels and allocator; a
        # compiled decoder compiles once per stream-count bucket, so it warms up at every count.
        if n != streams[0]:
            for key in (k for k, m in loaded.items() if getattr(m, "decode", None) == "compiled"):
                timed(calls[f"softprompt {key}"], n, new_tokens)
        results = interleave(calls, n, new_tokens, repeats=repeats, warmup=warmup if n == streams[0] else 0)
        for name, runs in results.items():
            record(name, n, runs)
    if not compiled:
        na["transformers generate static+compile"] = "left out (--no-compile, or quick mode)"
    else:
        ids, mask = encode_texts(tokenizer, [PROMPT], side="left")
        name = "transformers generate static+compile"
        try:
            call = compiled_generate(base, ids, mask, pad, new_tokens)
            record(name, 1, interleave({name: call}, 1, new_tokens, repeats=repeats, warmup=max(warmup, 2))[name])
        except Exception as exc:  # inductor missing a compiler, an unsupported model: the table says why
            na[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            log(f"  {name}: n/a ({na[name]})")
    result["mixed"] = mixed(eager, new_tokens, streams=mixed_streams, repeats=repeats, warmup=warmup, log=log)
    bandwidth = memory_bandwidth()
    fp32_bytes = weight_bytes(base)
    per_token = rows["softprompt eager"]["1"]["per_token_ms_median"]
    read_ms = fp32_bytes / bandwidth * 1000
    # Each float32 decode mode's one-stream step against one read of its weights (issue 27's 1.5x target).
    float32_ratios = {m: rows[f"softprompt {m}"]["1"]["per_token_ms_median"] / read_ms for m in modes}
    result["weights_read"] = {
        "float32_weight_bytes": fp32_bytes,
        "bandwidth_gb_s": bandwidth / 1e9,
        "read_ms": read_ms,
        "eager_float32_per_token_ms": per_token,
        "ratio": per_token / read_ms,
        "float32_ratios": float32_ratios,
    }
    log(
        f"  float32 weights {fp32_bytes / 2**20:.0f} MiB at {bandwidth / 1e9:.1f} GB/s: {read_ms:.1f} ms to read; "
        f"one-stream step / read time: " + ", ".join(f"{m} {r:.2f}x" for m, r in float32_ratios.items())
    )
    result["rows"], result["not_available"] = rows, na
    return result


def compiled_generate(base, ids, mask, pad: int, new_tokens: int):
    """transformers' static-cache generate with its decode step compiled, on CPU as well (transformers compiles
    automatically only on CUDA; `_compile_all_devices` is its own switch for other devices)."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False)
    config._compile_all_devices = True
    return transformers_call(base, ids, mask, pad, new_tokens, cache_implementation="static", compile_config=config)


def interleave(calls: dict, streams: int, new_tokens: int, *, repeats: int, warmup: int) -> dict[str, list[dict]]:
    """Each call's timed runs, the calls alternating within each repeat and each repeat starting one later."""
    for _ in range(warmup):
        for call in calls.values():
            timed(call, streams, new_tokens)
    keys = list(calls)
    out: dict[str, list[dict]] = {k: [] for k in keys}
    for r in range(repeats):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            out[key].append(timed(calls[key], streams, new_tokens))
    return out


def mixed(model, new_tokens: int, *, streams: int = 16, repeats: int, warmup: int, log) -> dict:
    """``streams`` streams, each with its own prompt-tuning adapter (8 tokens), against as many sharing one."""
    names = [f"decode-mix{i:02d}" for i in range(streams)]
    for i, name in enumerate(names):
        model.add_adapter(name, method="prompt_tuning", num_virtual_tokens=8, seed=i)
    ids, mask = encode_texts(model.tokenizer, [PROMPT] * streams, side="left")
    calls = {
        "single adapter": softprompt_call(model, ids, mask, [names[0]] * streams, new_tokens),
        "mixed adapters": softprompt_call(model, ids, mask, names, new_tokens),
    }
    runs = interleave(calls, streams, new_tokens, repeats=repeats, warmup=warmup)
    out: dict = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    out["streams"] = streams
    out["mixed_over_single"] = harness.paired_ratio(
        [r["seconds"] for r in runs["mixed adapters"]], [r["seconds"] for r in runs["single adapter"]]
    )
    log(
        f"  {streams} streams: single adapter {out['single adapter']:.1f} tok/s, mixed {out['mixed adapters']:.1f} "
        f"tok/s (time ratio {out['mixed_over_single']:.3f})"
    )
    for name in names:
        model.remove_adapter(name)
    return out


# ------------------------------------------------------------------------------------------ report
def markdown(result: dict) -> str:
    streams = result["streams"]
    lines = [
        f"Prompt {result['prompt_tokens']} tokens, {result['new_tokens']} new tokens greedy, per stream count: "
        "aggregate tokens/s | first-token ms | per-token ms median / p99.",
        "",
        "| system | " + " | ".join(f"{n} stream{'s' if n > 1 else ''}" for n in streams) + " |",
        "|---|" + "---|" * len(streams),
    ]
    for name, cells in result["rows"].items():
        out = []
        for n in streams:
            c = cells.get(str(n))
            out.append(
                "n/a"
                if c is None
                else f"{c['tokens_per_s']:.1f} | {c['first_token_ms']:.0f} | "
                f"{c['per_token_ms_median']:.1f} / {c['per_token_ms_p99']:.1f}".replace(" | ", " · ")
            )
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    for name in result["not_available"]:
        lines.append(f"| {name} | " + " | ".join(["n/a"] * len(streams)) + " |")
    m, w = result["mixed"], result["weights_read"]
    lines += [
        "",
        f"Mixed adapters, {m['streams']} streams: {m['mixed adapters']:.1f} tokens/s against {m['single adapter']:.1f} with one "
        f"adapter (time ratio {m['mixed_over_single']:.3f}).",
        f"float32 weights {w['float32_weight_bytes'] / 2**20:.0f} MiB at {w['bandwidth_gb_s']:.1f} GB/s (tensor sum): "
        f"{w['read_ms']:.1f} ms to read once; one-stream float32 step (median) over that: "
        + ", ".join(f"{m} {r:.2f}x" for m, r in w["float32_ratios"].items())
        + ".",
    ]
    if result["not_available"]:
        lines += ["", "Not available: " + "; ".join(f"{k}: {v}" for k, v in result["not_available"].items()) + "."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib  # only here: the backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, cells in result["rows"].items():
        xs = [n for n in result["streams"] if str(n) in cells]
        ys = [cells[str(n)]["tokens_per_s"] for n in xs]
        ax.plot(xs, ys, marker="o", label=name, linestyle="-" if len(xs) > 1 else "none")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(result["streams"], [str(n) for n in result["streams"]])
    ax.set_xlabel("streams (batch)")
    ax.set_ylabel(f"tokens/s, {result['new_tokens']} new tokens greedy")
    ax.set_title("Decode speed, smollm2-135m, CPU (shared 2 cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
