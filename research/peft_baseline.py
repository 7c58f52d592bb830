"""The PEFT side of the quality comparison: PEFT's model trained and scored exactly as softprompt's.

Same encoded rows, same epoch order (softprompt's seeded ``epoch_groups``), same optimizer, schedule and
steps, and the same label scoring (the log-likelihood of each label text after the prompt, within the
prompt budget softprompt's scoring uses), so a gap between the two is the implementations', not the setup's.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from research.models import Systems
from research.tasks import reported_metrics
from softprompt.engine.tokens import pad_batch, pad_id
from softprompt.training import classification_report, collate, epoch_groups, prompt_budget


def train_peft(systems: Systems, name: str, items, config, log) -> float:
    """PEFT's model trained on softprompt's encoded rows, in softprompt's epoch order, same optimizer."""
    model = systems.peft_for(name)
    params = systems.peft_params(name)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    steps = config.epochs * math.ceil(len(items) / config.batch_size)
    scheduler = get_scheduler(
        config.lr_schedule, optimizer, num_warmup_steps=math.ceil(config.warmup_ratio * steps), num_training_steps=steps
    )
    model.train()
    started = time.perf_counter()
    bar = tqdm(total=steps, desc=f"train PEFT {name}", unit="step")
    for epoch in range(config.epochs):
        for group in epoch_groups(items, epoch, config.seed, config.batch_size, 1):
            ids, mask, labels, _ = collate(group[0], pad_id(systems.tokenizer))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}")
    bar.close()
    model.eval()
    seconds = time.perf_counter() - started
    log(f"  PEFT {name}: {seconds:.0f} s")
    return seconds


@torch.no_grad()
def peft_label_scores(
    systems: Systems, name: str, texts: list[str], labels: list[str], max_length: int, batch_size: int = 16
) -> list[list[float]]:
    """Sum log-likelihood of each label text after each prompt, through PEFT's forward."""
    tok, model = systems.tokenizer, systems.peft_for(name)
    cands = [tok(label, add_special_tokens=False)["input_ids"] for label in labels]
    room = prompt_budget(systems.ours, labels, max_length)  # the same prompt budget softprompt's scoring uses
    seqs = [(tok(t)["input_ids"][-room:], c) for t in texts for c in cands]
    out = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s : s + batch_size]
        ids, mask = pad_batch([p + c for p, c in chunk], pad_id(tok), side="right")
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits = logits[:, logits.shape[1] - ids.shape[1] :].float().log_softmax(-1)
        for row, (p, c) in enumerate(chunk):
            out.append(sum(float(logits[row, len(p) - 1 + j, t]) for j, t in enumerate(c)))
    return [out[i * len(cands) : (i + 1) * len(cands)] for i in range(len(texts))]


def score_peft(systems: Systems, name: str, test, labels, budget) -> dict:
    """Accuracy, macro-F1 and the confusion matrix of PEFT's adapter on ``test``, by label scoring."""
    started = time.perf_counter()
    scores = peft_label_scores(systems, name, [e.text for e in test], labels, budget["max_length"])
    preds = [labels[max(range(len(labels)), key=row.__getitem__)] for row in scores]
    report = classification_report([e.target for e in test], preds, labels)
    return {**reported_metrics(report), "eval_seconds": time.perf_counter() - started}


@torch.no_grad()
def peft_loss(systems: Systems, name: str, items, batch_size: int = 16) -> tuple[float, int]:
    """``(summed negative log-likelihood, tokens)`` of the encoded ``items`` through PEFT's forward."""
    model, total, tokens = systems.peft_for(name), 0.0, 0
    for s in range(0, len(items), batch_size):
        ids, mask, labels, _ = collate(items[s : s + batch_size], pad_id(systems.tokenizer))
        count = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * count
        tokens += count
    return total, tokens
