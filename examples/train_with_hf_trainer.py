"""Train a softprompt adapter with transformers' `Trainer`: checkpoints, resuming, early stopping and
reloading the best adapter all go through `Trainer`'s own machinery.

    .venv/bin/python examples/train_with_hf_trainer.py --model smollm2-135m --output runs/hf-trainer --max-steps 60
    .venv/bin/python examples/train_with_hf_trainer.py ... --resume     # continue from the last checkpoint

The adapter lands in ``OUTPUT/adapter`` in PEFT's layout (``peft.PeftModel.from_pretrained`` loads it, so does
``softprompt generate --adapter sentiment=OUTPUT/adapter``); checkpoints in ``OUTPUT/checkpoints``.
"""

import argparse
from pathlib import Path

from datasets import load_dataset
from transformers import DataCollatorForSeq2Seq, EarlyStoppingCallback, Trainer, TrainingArguments

import softprompt
from softprompt.integrations.hf import SaveAdapterCallback, TrainableAdapter

DATA = Path(__file__).with_name("sentiment_tweets.jsonl")
TEMPLATE = "Tweet: {text}\nSentiment:"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a built-in name, local checkpoint or hub id")
    parser.add_argument("--output", default="runs/hf-trainer")
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
    tokenizer = model.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def encode(row: dict) -> dict:
        # Loss on the answer only: the prompt's labels are -100.
        prompt = tokenizer(TEMPLATE.format(text=row["text"]), add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + row["label"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}

    data = load_dataset("json", data_files=str(DATA), split="train").train_test_split(test_size=0.25, seed=0)
    data = data.map(encode, remove_columns=["text", "label"])

    every = max(1, args.max_steps // 6)
    training_args = TrainingArguments(
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
    )
    trainable = TrainableAdapter(model, "sentiment")
    trainer = Trainer(
        model=trainable,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
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
