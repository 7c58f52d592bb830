"""Sections 2-4: inference overhead, mixed-adapter serving, classification cost.

Generation everywhere is greedy and produces exactly ``new_tokens`` tokens per row on every system
(end-of-sequence disabled: softprompt's loop is run without a tokenizer, whose eos is the only thing
that stops it; transformers/PEFT get ``min_new_tokens``), so each system does the same work.
"""

from __future__ import annotations

import contextlib
import random

import torch

from softprompt.engine.generation import GenerationConfig, generate, generate_batch
from softprompt.engine.tokens import encode_texts, pad_batch, pad_id

from . import data, harness
from .models import Systems


@contextlib.contextmanager
def no_eos(model):
    """softprompt's generation loop stops at the tokenizer's eos ids; without a tokenizer it never stops."""
    saved = model.tokenizer
    model.tokenizer = None
    try:
        yield model
    finally:
        model.tokenizer = saved


def ours_generate(model, ids, mask, adapters, new_tokens: int) -> list[list[int]]:
    with no_eos(model):
        out = generate_batch(model, ids, mask, adapters, GenerationConfig(max_new_tokens=new_tokens))
    return [g.token_ids for g in out]


def hf_generate(model, ids, mask, new_tokens: int, pad_id: int) -> list[list[int]]:
    """transformers' (or PEFT's) generate, greedy, exactly ``new_tokens`` tokens."""
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            num_beams=1,
        )
    return out[:, ids.shape[1] :].tolist()


def _pad_id(tokenizer) -> int:
    return pad_id(tokenizer)


# ------------------------------------------------------------------------------------------ section 2
def run_overhead(
    systems: Systems,
    ids,
    mask,
    *,
    sizes=(8, 20),
    new_tokens: int,
    repeats: int,
    warmup: int,
    forward_repeats: int | None = None,
    log=print,
) -> list[dict]:
    """Forward and greedy generation: bare base model vs softprompt (no adapter / prompt-tuned) vs PEFT.

    ``forward_repeats`` (default ``repeats``): rounds of the forward comparison, whose overhead of a few
    percent needs more paired rounds than generation's to resolve on a noisy machine; a forward round
    costs a third of a generation round, so more of them fit the same time.
    """
    ours, base = systems.ours, systems.base
    pad = _pad_id(systems.tokenizer)
    names = {}
    for n in sizes:
        names[n] = f"infer-pt{n}"
        # Vocabulary-sampled init, seeded per size: the two systems only need to start from the same weights.
        systems.add(names[n], "prompt_tuning", n, seed=n)
    peft_models = {n: systems.peft_for(names[n]) for n in sizes}

    def peft_call(n, fn):
        def call():
            peft_models[n].set_adapter(names[n])  # both adapters live in one PeftModel
            return fn(peft_models[n])

        return call

    rows = []
    # Forward: logits of every text position (what a scoring/reranking forward returns).
    fwd = {
        "bare": lambda: base(input_ids=ids, attention_mask=mask).logits,
        "softprompt_none": lambda: ours(ids, mask, adapters=None).logits,
    }
    for n in sizes:
        fwd[f"softprompt_pt{n}"] = lambda n=n: ours(ids, mask, adapters=names[n]).logits
        fwd[f"peft_pt{n}"] = peft_call(n, lambda m: m(input_ids=ids, attention_mask=mask).logits)
    with torch.no_grad():
        times = harness.interleaved(fwd, repeats=forward_repeats or repeats, warmup=warmup)
    rows += _overhead_rows("forward", times, sizes, log)

    gen = {
        "bare": lambda: hf_generate(base, ids, mask, new_tokens, pad),
        "softprompt_none": lambda: ours_generate(ours, ids, mask, None, new_tokens),
    }
    for n in sizes:
        gen[f"softprompt_pt{n}"] = lambda n=n: ours_generate(ours, ids, mask, names[n], new_tokens)
        gen[f"peft_pt{n}"] = peft_call(n, lambda m: hf_generate(m, ids, mask, new_tokens, pad))
    times = harness.interleaved(gen, repeats=repeats, warmup=warmup)
    gen_rows = _overhead_rows(f"generate {new_tokens} tokens", times, sizes, log)
    # Sanity: the same adapter gives the same greedy tokens here and in PEFT (and the bare model in both).
    same_bare = gen["bare"]() == gen["softprompt_none"]()
    for row, n in zip(gen_rows, sizes):
        a, b = gen[f"softprompt_pt{n}"](), gen[f"peft_pt{n}"]()
        row["rows_identical_to_peft"] = sum(x == y for x, y in zip(a, b)) / len(a)
        row["bare_identical"] = same_bare
    return rows + gen_rows


def _overhead_rows(task, times, sizes, log) -> list[dict]:
    ms = {k: harness.median_ms(v) for k, v in times.items()}
    out = []
    for n in sizes:
        sp, peft = ms[f"softprompt_pt{n}"], ms[f"peft_pt{n}"]
        row = {
            "task": task,
            "num_virtual_tokens": n,
            "bare_ms": ms["bare"],
            "softprompt_none_ms": ms["softprompt_none"],
            "softprompt_ms": sp,
            "peft_ms": peft,
            # Overheads and ratios pair the calls of each round (see harness.paired_ratio).
            "overhead_vs_bare": harness.paired_ratio(times[f"softprompt_pt{n}"], times["bare"]) - 1,
            "overhead_vs_bare_ci95": [
                x - 1 for x in harness.paired_ratio_ci(times[f"softprompt_pt{n}"], times["bare"])
            ],
            "overhead_vs_softprompt_none": harness.paired_ratio(times[f"softprompt_pt{n}"], times["softprompt_none"])
            - 1,
            "peft_overhead_vs_bare": harness.paired_ratio(times[f"peft_pt{n}"], times["bare"]) - 1,
            "ratio_vs_peft": harness.paired_ratio(times[f"softprompt_pt{n}"], times[f"peft_pt{n}"]),
            "overhead_vs_bare_of_medians": harness.ratio(sp, ms["bare"]) - 1,
            "runs_ms": {
                k: [t * 1000 for t in v]
                for k, v in times.items()
                if k in ("bare", "softprompt_none") or k.endswith(f"pt{n}")
            },
        }
        out.append(row)
        log(
            f"  {task:>20} pt{n}: bare {ms['bare']:7.1f}  softprompt(none) {ms['softprompt_none']:7.1f}  "
            f"softprompt {sp:7.1f}  peft {peft:7.1f} ms  overhead vs bare {row['overhead_vs_bare']:+.1%} "
            f"(95% CI {row['overhead_vs_bare_ci95'][0]:+.1%} to {row['overhead_vs_bare_ci95'][1]:+.1%})  "
            f"vs peft {row['ratio_vs_peft']:.2f}"
        )
    return out


# ------------------------------------------------------------------------------------------ section 3
def run_mixed(
    systems: Systems,
    prompts: list[str],
    *,
    counts=(1, 4, 16),
    batch_size: int,
    new_tokens: int,
    num_virtual_tokens: int = 8,
    repeats: int,
    warmup: int,
    log=print,
) -> dict:
    """A request stream whose requests name 1, 4 or 16 adapters (round robin, so every batch mixes them all).

    softprompt: consecutive batches of ``batch_size`` requests, whatever their adapters, one call each.
    PEFT: one adapter active at a time, so requests are grouped by adapter (``set_adapter``, then the
    group in batches of up to ``batch_size``), the best it can do for a stream of mixed requests.
    """
    tok, pad = systems.tokenizer, _pad_id(systems.tokenizer)
    names = [f"mix{i:02d}" for i in range(max(counts))]
    for i, name in enumerate(names):
        systems.add(name, "prompt_tuning", num_virtual_tokens, seed=100 + i)
    peft_model = systems.peft_for(names[0])

    plans = {}
    for k in counts:
        assigned = [names[i % k] for i in range(len(prompts))]
        ours_batches = []
        for s in range(0, len(prompts), batch_size):
            ids, mask = encode_texts(tok, prompts[s : s + batch_size], side="left")
            ours_batches.append((ids, mask, assigned[s : s + batch_size]))
        peft_batches = []
        for name in dict.fromkeys(assigned):
            group = [p for p, a in zip(prompts, assigned) if a == name]
            for s in range(0, len(group), batch_size):
                ids, mask = encode_texts(tok, group[s : s + batch_size], side="left")
                peft_batches.append((name, ids, mask))
        plans[k] = (ours_batches, peft_batches)

    def ours_stream(k):
        return lambda: [ours_generate(systems.ours, ids, mask, a, new_tokens) for ids, mask, a in plans[k][0]]

    def peft_stream(k):
        def serve():
            out = []
            for name, ids, mask in plans[k][1]:
                peft_model.set_adapter(name)
                out.append(hf_generate(peft_model, ids, mask, new_tokens, pad))
            return out

        return serve

    fns = {}
    for k in counts:
        fns[f"softprompt_{k}"] = ours_stream(k)
        fns[f"peft_{k}"] = peft_stream(k)
    times = harness.interleaved(fns, repeats=repeats, warmup=warmup)
    tokens = len(prompts) * new_tokens
    rows = []
    single = tokens / (harness.median_ms(times[f"softprompt_{counts[0]}"]) / 1000)
    for k in counts:
        ours_ms, peft_ms = harness.median_ms(times[f"softprompt_{k}"]), harness.median_ms(times[f"peft_{k}"])
        ours_tps, peft_tps = tokens / (ours_ms / 1000), tokens / (peft_ms / 1000)
        rows.append(
            {
                "adapters": k,
                "softprompt_ms": ours_ms,
                "peft_ms": peft_ms,
                "softprompt_tokens_per_s": ours_tps,
                "peft_tokens_per_s": peft_tps,
                # Throughput ratios pair the calls of each round, as the inference overheads do: the
                # same stream's calls drift by tens of percent over the minutes a section takes.
                "softprompt_vs_single": harness.paired_ratio(
                    times[f"softprompt_{counts[0]}"], times[f"softprompt_{k}"]
                ),
                "speedup_vs_peft": harness.paired_ratio(times[f"peft_{k}"], times[f"softprompt_{k}"]),
                "softprompt_vs_single_of_medians": ours_tps / single,
                "speedup_vs_peft_of_medians": ours_tps / peft_tps,
                "peft_calls": len(plans[k][1]),
                "softprompt_calls": len(plans[k][0]),
                "runs_ms": {s: [t * 1000 for t in times[f"{s}_{k}"]] for s in ("softprompt", "peft")},
            }
        )
        log(
            f"  mixed {k:>2} adapters: softprompt {ours_tps:7.1f} tok/s ({rows[-1]['softprompt_vs_single']:.0%} of "
            f"single)  peft {peft_tps:7.1f} tok/s in {len(plans[k][1])} calls  speedup {rows[-1]['speedup_vs_peft']:.2f}x"
        )
    return {
        "requests": len(prompts),
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "num_virtual_tokens": num_virtual_tokens,
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------ section 4
def train_classifier(
    systems: Systems,
    name: str,
    train: list[data.Example],
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int = 0,
    log=print,
) -> list[float]:
    """Prompt-tune ``name`` on labelled examples (loss on the label token only), with softprompt."""
    tok, model = systems.tokenizer, systems.ours
    rng = random.Random(seed)
    pool = [ex for ex in train if len(ex.text) < 200]
    optimizer = torch.optim.AdamW(model.adapters[name].parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        rows, labels = [], []
        for ex in rng.sample(pool, batch):
            text = tok(data.prompt(ex))["input_ids"]
            answer = tok(data.LABELS[ex.label], add_special_tokens=False)["input_ids"]
            rows.append(text + answer)
            labels.append([-100] * len(text) + answer)
        ids, mask = pad_batch(rows, _pad_id(tok), side="right")
        label_ids, _ = pad_batch(labels, -100, side="right")
        optimizer.zero_grad(set_to_none=True)
        loss = model(ids, mask, adapters=name, labels=label_ids).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    log(
        f"  trained {name!r}: {steps} steps, loss {sum(losses[:5]) / min(5, len(losses)):.3f} -> "
        f"{sum(losses[-5:]) / min(5, len(losses)):.3f}"
    )
    return losses


def run_classification(
    systems: Systems,
    train,
    dev,
    *,
    examples: int,
    batch_size: int,
    train_steps: int,
    repeats: int,
    warmup: int,
    log=print,
) -> dict:
    """Label scoring (`model.score`) vs generate-and-match on the same adapter and the same labelled examples."""
    name = "cls"
    systems.add(name, "prompt_tuning", 8, peft=False, init_text=data.INIT_TEXT)
    losses = train_classifier(systems, name, train, steps=train_steps, batch=8, lr=3e-2, log=log) if train_steps else []
    model, tok = systems.ours, systems.tokenizer
    dev = dev[:examples]
    texts = [data.prompt(ex) for ex in dev]
    labels = [data.LABELS[0], data.LABELS[1]]
    label_len = max(len(tok(lab, add_special_tokens=False)["input_ids"]) for lab in labels)
    gen_tokens = label_len + 1  # the label, plus one token to see that it ended

    def scoring():
        preds = []
        for s in range(0, len(texts), batch_size):
            preds += [r.label for r in model.score(texts[s : s + batch_size], labels=labels, adapters=name)]
        return preds

    def generate_match():
        preds = []
        for s in range(0, len(texts), batch_size):
            outs = generate(model, texts[s : s + batch_size], adapters=name, max_new_tokens=gen_tokens)
            for out in outs:
                words = out.strip().split()
                first = words[0].strip(".,:;!\"'").lower() if words else ""
                preds.append(next((lab for lab in labels if lab.strip().lower() == first), None))
        return preds

    times = harness.interleaved({"score": scoring, "generate_match": generate_match}, repeats=repeats, warmup=warmup)
    rows = []
    for method, fn in (("score", scoring), ("generate_match", generate_match)):
        preds = fn()
        gold = [data.LABELS[ex.label] for ex in dev]
        per100 = harness.median_ms(times[method]) * 100 / len(dev)
        rows.append(
            {
                "method": method,
                "ms_per_100": per100,
                "accuracy": sum(p == g for p, g in zip(preds, gold)) / len(dev),
                "invalid": sum(p is None for p in preds),
                "runs_ms": [t * 1000 for t in times[method]],
                "predictions": preds,
            }
        )
    agree = sum(a == b for a, b in zip(rows[0]["predictions"], rows[1]["predictions"])) / len(dev)
    for r in rows:
        r.pop("predictions")
        log(
            f"  classify {r['method']:>14}: {r['ms_per_100']:8.1f} ms / 100 examples  accuracy {r['accuracy']:.1%}  "
            f"invalid {r['invalid']}"
        )
    return {
        "examples": len(dev),
        "batch_size": batch_size,
        "labels": labels,
        "generate_tokens": gen_tokens,
        "train_steps": train_steps,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "predictions_agree": agree,
        "generate_vs_score": harness.ratio(rows[1]["ms_per_100"], rows[0]["ms_per_100"]),
        "rows": rows,
    }
