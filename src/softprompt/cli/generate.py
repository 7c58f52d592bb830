"""``softprompt generate``: every prompt with every adapter given (and the bare model), in one mixed batch."""

from __future__ import annotations

import argparse
import json

from softprompt import load
from softprompt.cli.common import add_adapter_argument, add_model_argument, parse_adapter_specs
from softprompt.engine.generation import generate

NAME = "generate"
HELP = "Generate text with one or more adapters in one mixed batch."
EXAMPLES = """
    Every prompt is generated with every adapter given (and with the bare model with --base),
    all in one mixed batch.

    examples:
      softprompt generate --model smollm2-135m --adapter quotes=runs/quotes "Write a quote about rain:"
      softprompt generate --model smollm2-135m --adapter a=runs/a --adapter b=runs/b --base \\
          --max-new-tokens 20 --json "Hello" "Tell me a joke"
    """


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_adapter_argument(parser, "Adapter to load (repeatable).")
    parser.add_argument("--base", action="store_true", help="Also generate with the bare base model.")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Tokens to generate per prompt (default 32).")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples.")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass when sampling.")
    parser.add_argument("--stop", action="append", help="Stop string (repeatable).")
    parser.add_argument("--seed", type=int, default=None, help="Seed for sampling.")
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16.")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    parser.add_argument("prompts", nargs="+", metavar="PROMPT")


def run(args: argparse.Namespace) -> int:
    adapters = parse_adapter_specs(args.adapter)
    model = load(args.model, dtype=args.dtype)
    for name, path in adapters.items():
        model.load_adapter(path, name=name)
    columns: list[str | None] = list(adapters) + ([None] if args.base or not adapters else [])
    prompts = [p for p in args.prompts for _ in columns]
    names = [c for _ in args.prompts for c in columns]
    results = generate(model, prompts, adapters=names, return_details=True, max_new_tokens=args.max_new_tokens,
                       do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_p=args.top_p,
                       stop=args.stop or (), seed=args.seed)
    rows = [{"prompt": p, "adapter": n, "text": r.text, "finish_reason": r.finish_reason}
            for p, n, r in zip(prompts, names, results)]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for row in rows:
            print(f"[{row['adapter'] or 'base'}] {row['prompt']}{row['text']}")
    return 0
