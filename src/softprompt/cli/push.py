"""``softprompt push``: an adapter to the Hugging Face Hub, in PEFT's layout with a model card."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from softprompt.adapters.hub import push_adapter
from softprompt.options import add_arguments as add_option_arguments
from softprompt.options import option

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


@dataclass
class PushOptions:
    """The options of ``softprompt push``."""

    path: str = option("", "Adapter directory.", positional=True)
    repo_id: str = option("", "Hub repo to create or update: 'owner/name'.", positional=True)
    private: bool = option(False, "Create the repo private (an existing repo keeps its setting).")
    token: str | None = option(None, "Hub token (default: the one `hf auth login` stored, or $HF_TOKEN).")
    message: str | None = option(None, "Commit message (default: 'Upload <folder> with softprompt').")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_arguments(parser, PushOptions)


def run(args: argparse.Namespace) -> int:
    url = push_adapter(args.path, args.repo_id, private=args.private, token=args.token, commit_message=args.message)
    print(f"pushed {args.path} to {args.repo_id}: {url}")
    return 0
