"""``softprompt generate``: every prompt with every adapter given (and the bare model), in one mixed batch."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from softprompt import load
from softprompt.adapters.training_format import TrainingFormat, format_inputs
from softprompt.cli.common import (
    adapter_option,
    decode_option,
    dtype_option,
    model_option,
    parse_adapter_specs,
    quantize_option,
)
from softprompt.engine.adapter_name import row_key
from softprompt.engine.generation import Generation, generate
from softprompt.options import add_arguments as add_option_arguments
from softprompt.options import option

NAME = "generate"
HELP = "Generate text with one or more adapters in one mixed batch."
EXAMPLES = """
    Every prompt is generated with every adapter given (and with the bare model with --base),
    all in one mixed batch.

    examples:
      softprompt generate --model smollm2-135m --adapter quotes=runs/quotes "Write a quote about rain:"
      softprompt generate --model smollm2-135m --adapter a=runs/a --adapter b=runs/b --base \\
          --max-new-tokens 20 --json "Hello" "Tell me a joke"
      softprompt generate --model smollm2-135m --adapter a=runs/demo/sentiment "great day!"
          (rendered through the template the adapter was trained with; --raw sends it as is)
    """


@dataclass
class GenerateOptions:
    """The options of ``softprompt generate``."""

    model: str | None = model_option()
    adapter: list[str] = adapter_option("Adapter to load (repeatable).")
    base: bool = option(False, "Also generate with the bare base model.")
    raw: bool = option(
        False,
        "Send each prompt as is. By default a prompt for an adapter trained here is first rendered through the "
        "template it was trained with (the bare model's too, when all adapters share one template).",
    )
    max_new_tokens: int = option(32, "Tokens to generate per prompt (default 32).")
    temperature: float = option(0.0, "0 = greedy (default); above 0 samples.")
    top_p: float = option(1.0, "Nucleus sampling mass when sampling (default 1.0).")
    stop: list[str] | None = option(None, "Stop string (repeatable).")
    seed: int | None = option(None, "Seed for sampling.")
    dtype: str | None = dtype_option()
    quantize: str | None = quantize_option()
    decode: str | None = decode_option()
    json: bool = option(False, "Print JSON instead of text.")
    prompts: list[str] = option(list, "", positional=True, metavar="PROMPT")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_arguments(parser, GenerateOptions)


def run(args: argparse.Namespace) -> int:
    adapters = parse_adapter_specs(args.adapter)
    model = load(args.model, dtype=args.dtype, quantize=args.quantize, decode=args.decode)
    for name, path in adapters.items():
        model.load_adapter(path, name=name)
    # A multitask adapter answers once per task (rows NAME:TASK).
    tasks = {name: model.get_adapter(name).num_tasks for name in adapters}
    columns: list[str | None] = [row_key(n, t) for n in adapters for t in range(tasks[n]) or [None]]
    columns += [None] if args.base or not adapters else []
    prompts = [p for p in args.prompts for _ in columns]
    names = [c for _ in args.prompts for c in columns]
    if not args.raw:
        prompts = format_inputs(model, prompts, names)
        # The bare model reads the same prompt when every adapter was trained on one template: a fair comparison.
        templates = {fmt.template if (fmt := model.get_adapter(n).training_format) else None for n in adapters}
        if len(templates) == 1 and (shared := templates.pop()):
            prompts = [TrainingFormat(template=shared).format(p) if n is None else p for p, n in zip(prompts, names)]
    results = generate(
        model,
        prompts,
        adapters=names,
        return_details=True,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature or 1.0,
        top_p=args.top_p,
        stop=args.stop or (),
        seed=args.seed,
    )
    rows = []
    for p, n, r in zip(prompts, names, results):
        assert isinstance(r, Generation)  # return_details=True
        rows.append({"prompt": p, "adapter": n, "text": r.text, "finish_reason": r.finish_reason})
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for row in rows:
            print(f"[{row['adapter'] or 'base'}] {row['prompt']}{row['text']}")
    return 0
