"""Train a softprompt adapter with TRL's `SFTTrainer` on prompt/completion pairs (loss on the completion only).

    .venv/bin/python examples/train_with_trl.py --model smollm2-135m --output runs/trl --max-steps 60

The virtual tokens live in the key/value prefix, not in the sequence, so the hidden states and labels TRL
sees keep the text's own length (PEFT's prompt learning prepends them, which breaks TRL's shapes). The
adapter lands in ``OUTPUT/adapter`` in PEFT's layout; checkpoints in ``OUTPUT/checkpoints``.
"""

import argparse
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import EarlyStoppingCallback
from trl import SFTConfig, SFTTrainer

import softprompt
from softprompt.integrations.hf import SaveAdapterCallback, TrainableAdapter

DATA = Path(__file__).with_name("sentiment_tweets.jsonl")
TEMPLATE = "Tweet: {text}\nSentiment:"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a built-in name, local checkpoint or hub id")
    parser.add_argument("--output", default="runs/trl")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT")
    args = parser.parse_args()

    model = softprompt.load(args.model)
    model.add_adapter(
        "sentiment",
        method="prompt_tuning",
        num_virtual_tokens=8,
        seed=0,
        init_text="Classify the sentiment of the tweet:",
    )

    data = load_dataset("json", data_files=str(DATA), split="train").train_test_split(test_size=0.25, seed=0)
    data = data.map(
        lambda row: {"prompt": TEMPLATE.format(text=row["text"]), "completion": " " + row["label"]},
        remove_columns=["text", "label"],
    )

    every = max(1, args.max_steps // 6)
    config = SFTConfig(
        output_dir=f"{args.output}/checkpoints",
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        learning_rate=3e-2,
        logging_steps=every,
        eval_strategy="steps",
        eval_steps=every,
        save_steps=every,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        report_to=[],
        seed=0,
        # SFTConfig's own defaults: bf16 (a GPU's; refused on a CPU) and activation checkpointing, which transformers
        # skips anyway for the frozen base, kept in eval mode.
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
    )
    trainable = TrainableAdapter(model, "sentiment")
    trainer = SFTTrainer(
        model=trainable,
        args=config,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        processing_class=model.tokenizer,
        callbacks=[SaveAdapterCallback(), EarlyStoppingCallback(early_stopping_patience=3)],
    )
    trainer.train(resume_from_checkpoint=args.resume or None)

    trainable.save_pretrained(f"{args.output}/adapter")  # the best adapter: load_best_model_at_end reloaded it
    print(f"best checkpoint {trainer.state.best_model_checkpoint} (eval loss {trainer.state.best_metric:.4f})")
    print(f"adapter saved to {args.output}/adapter")
    prompts = [TEMPLATE.format(text="What a lovely day!"), TEMPLATE.format(text="This is awful.")]
    print(model.generate(prompts, adapters="sentiment", max_new_tokens=2))


if __name__ == "__main__":
    main()
