"""``softprompt push``: an adapter to the Hugging Face Hub, in PEFT's layout with a model card."""

from __future__ import annotations

import argparse

from softprompt.adapters.hub import push_adapter

NAME = "push"
HELP = "Upload an adapter to the Hugging Face Hub (PEFT's layout and a model card)."
EXAMPLES = """
    Uploads an adapter directory to the Hugging Face Hub in PEFT's layout (PeftModel.from_pretrained
    loads it), with softprompt's records (template, verbalizer, training-row fingerprints) and a
    generated model card (README.md; one in the directory is used instead). Log in first
    (`hf auth login`) or pass --token.

    examples:
      softprompt push examples/adapters/sst2-gemma3-270m your-name/sst2-gemma3-270m-prompt
      softprompt push runs/sentiment/default your-name/tweet-sentiment --private
      softprompt eval --model gemma3-270m --adapter your-name/sst2-gemma3-270m-prompt --data dev.tsv
    """


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="Adapter directory.")
    parser.add_argument("repo_id", help="Hub repo to create or update: 'owner/name'.")
    parser.add_argument("--private", action="store_true",
                        help="Create the repo private (an existing repo keeps its setting).")
    parser.add_argument("--token", help="Hub token (default: the one `hf auth login` stored, or $HF_TOKEN).")
    parser.add_argument("--message", help="Commit message (default: 'Upload <folder> with softprompt').")


def run(args: argparse.Namespace) -> int:
    url = push_adapter(args.path, args.repo_id, private=args.private, token=args.token, commit_message=args.message)
    print(f"pushed {args.path} to {args.repo_id}: {url}")
    return 0
