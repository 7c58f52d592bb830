"""The Python API end to end on a tiny random GPT-2 (no download): train two adapters, mix them in one batch.

.venv/bin/python examples/python_api.py
"""

import tempfile

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from softprompt import SoftPromptModel
from softprompt.engine.tokens import pad_batch


def byte_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


torch.manual_seed(0)
tokenizer = byte_tokenizer()
base = GPT2LMHeadModel(
    GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=len(tokenizer), eos_token_id=1, bos_token_id=1, initializer_range=0.5
    )
)
model = SoftPromptModel(base, tokenizer)
model.add_adapter("yes", method="prompt_tuning", num_virtual_tokens=16, seed=0)
model.add_adapter("no", method="prefix_tuning", num_virtual_tokens=4, seed=0)

# Teach adapter "yes" to answer "yes" and adapter "no" to answer "no", in mixed batches.
prompts = ["Q: is it? A: ", "Q: really? A: "]
rows, labels, names = [], [], []
for name in ("yes", "no"):
    for p in prompts:
        prompt_ids = tokenizer(p)["input_ids"]
        answer = tokenizer(name)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer)
        labels.append([-100] * len(prompt_ids) + answer)
        names.append(name)
ids, mask = pad_batch(rows, pad=0, side="right")
label_ids, _ = pad_batch(labels, pad=-100, side="right")
optimizer = torch.optim.AdamW([p for a in model.adapters.values() for p in a.parameters()], lr=0.1)
model.train()
for _step in range(200):
    loss = model(ids, mask, adapters=names, labels=label_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
model.eval()
print("final loss", round(loss.item(), 4))
print(model.generate(["Q: is it? A: "] * 2, adapters=["yes", "no"], max_new_tokens=4))
print(model.score(["Q: really? A: "] * 2, labels=["yes", "no"], adapters=["yes", "no"]))
with tempfile.TemporaryDirectory() as tmp:
    model.save_adapter("yes", f"{tmp}/yes")  # PEFT layout: adapter_config.json + adapter_model.safetensors
    other = SoftPromptModel(base, tokenizer)
    other.load_adapter(f"{tmp}/yes")
    print(other.generate(["Q: is it? A: "], adapters=["yes"], max_new_tokens=4))
