"""Share an adapter on the Hugging Face Hub: its PEFT files, softprompt's records and a model card.

The upload is PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``), so PEFT users load
it with ``PeftModel.from_pretrained``; softprompt's ``softprompt.json`` (checksums, base model shape) and
``training_state.*`` (template, verbalizer, fingerprints of the training rows) go with it, so
``softprompt eval``/``predict`` on the hub id need no ``--template`` and still skip rows it trained on.
Checkpoints (optimizer state of an interrupted run) stay local. huggingface_hub does the transfer.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import huggingface_hub  # HfApi is looked up at call time, so a stand-in can replace it (the tests do)
from huggingface_hub.utils import HFValidationError, validate_repo_id

from softprompt.adapters.peft_format import (
    CONFIG_FILE,
    META_FILE,
    STATE_FILE,
    STATE_META_FILE,
    WEIGHTS_FILE,
    check_adapter_dir,
    is_hub_id,
    read_json,
    read_training_state,
    verify_checksum,
)
from softprompt.errors import SoftPromptError
from softprompt.models.names import BUILTIN_HUB_IDS, hub_id_for

CARD_FILE = "README.md"
UPLOADED = (CONFIG_FILE, WEIGHTS_FILE, META_FILE, STATE_FILE, STATE_META_FILE, "loss_curve.png")


def model_card(path: str | Path) -> str:
    """A hub model card for the adapter in ``path``: metadata the hub indexes, then how to use it."""
    folder = Path(path)
    peft = read_json(folder / CONFIG_FILE)
    meta = read_json(folder / META_FILE) if (folder / META_FILE).exists() else {}
    _, info = read_training_state(folder)
    base = hub_id_for(meta.get("base_model") or peft.get("base_model_name_or_path"))
    if base and not is_hub_id(base):
        base = None  # a local path means nothing to the hub (nor to whoever downloads the adapter)
    method = str(meta.get("method") or peft.get("peft_type", "")).lower()
    size_kib = (folder / WEIGHTS_FILE).stat().st_size / 1024
    front = [
        "---",
        "library_name: peft",
        *([f"base_model: {base}"] if base else []),
        "tags:",
        "- softprompt",
        f"- {method.replace('_', '-')}",
        "---",
        "",
    ]
    body = [
        f"# {folder.name}",
        "",
        f"A {method.replace('_', ' ')} adapter ({peft.get('num_virtual_tokens', peft.get('adapter_len'))} virtual tokens, "
        f"{size_kib:.1f} KiB) for `{base or 'its base model'}`, trained with softprompt. "
        "The files are PEFT's layout.",
        "",
    ]
    data = info.get("data") or {}
    if data.get("template"):
        body += ["Trained on prompts rendered with the template", "", "```text", data["template"], "```", ""]
    if data.get("verbalizer"):
        labels = ", ".join(f"`{raw}` -> `{text!r}`" for raw, text in data["verbalizer"].items())
        body += [f"Labels (raw value -> label text scored after the prompt): {labels}.", ""]
    metrics = info.get("metrics") or {}
    if isinstance(metrics.get("accuracy"), (int, float)) and metrics.get("n"):
        body += [
            f"Validation while training (the rows that chose this checkpoint, not a test set): accuracy "
            f"{metrics['accuracy']:.1%} on {metrics['n']} rows.",
            "",
        ]
    auto = "AutoModelForSeq2SeqLM" if peft.get("task_type") == "SEQ_2_SEQ_LM" else "AutoModelForCausalLM"
    softprompt_base = meta.get("base_model") if meta.get("base_model") in BUILTIN_HUB_IDS else base
    body += [
        "## Use",
        "",
        "```bash",
        f"softprompt eval --model {softprompt_base or 'BASE_MODEL'} --adapter REPO_ID --data held_out.csv",
        "```",
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {auto}",
        "",
        f"base = {auto}.from_pretrained({json.dumps(base or 'BASE_MODEL')})",
        'model = PeftModel.from_pretrained(base, "REPO_ID")',
        "```",
        "",
    ]
    return "\n".join(front + body)


def push_saved(model, name: str, repo_id: str, **options) -> str:
    """Save ``model``'s adapter ``name`` to a temporary directory and `push_adapter` it (``options``: its keywords)."""
    with tempfile.TemporaryDirectory(prefix="softprompt-save-") as tmp:
        folder = f"{tmp}/{name}"
        model.save_adapter(name, folder)
        return push_adapter(folder, repo_id, **options)


def push_adapter(
    path: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    api=None,
) -> str:
    """Upload the adapter directory ``path`` to the hub repo ``repo_id`` (created if missing); returns the
    commit URL. The files are checked (config, checksums) before anything is sent."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise SoftPromptError(
            f"repo id {repo_id!r}: expected 'name' or 'owner/name' (letters, digits, '-', '_', '.'; no '--' or '..')"
        ) from None
    folder = Path(path).expanduser()
    if not folder.is_dir():  # check_adapter_dir lets hub ids through; a push needs the files here
        raise SoftPromptError(f"{folder}: no such adapter directory (push uploads a local one)")
    check_adapter_dir(folder)
    meta = read_json(folder / META_FILE) if (folder / META_FILE).exists() else {}
    for file in (WEIGHTS_FILE, STATE_FILE):
        verify_checksum(folder, file, meta)  # never publish a file that changed since it was saved
    api = api or huggingface_hub.HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="softprompt-push-") as staging:
        for name in UPLOADED:
            if (folder / name).is_file():
                shutil.copy2(folder / name, Path(staging) / name)
        _strip_local_paths(Path(staging) / STATE_META_FILE)
        card = folder / CARD_FILE  # a card the user wrote wins over the generated one
        (Path(staging) / CARD_FILE).write_text(
            card.read_text(encoding="utf-8") if card.is_file() else model_card(folder).replace("REPO_ID", repo_id),
            encoding="utf-8",
        )
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                commit_message=commit_message or f"Upload {folder.name} with softprompt",
            )
        except Exception as exc:  # network, authentication, permissions: one line, no traceback
            raise SoftPromptError(
                f"pushing {folder} to {repo_id!r} failed: {exc.__class__.__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}"
            ) from None
    return str(getattr(commit, "commit_url", commit))


def _strip_local_paths(state_meta: Path) -> None:
    """Keep only the file names of the training data (and starting adapter) in the uploaded copy: where
    they lay on this machine is nobody else's business, and means nothing elsewhere."""
    if not state_meta.is_file():
        return
    info = read_json(state_meta)
    data = info.get("data")
    if isinstance(data, dict):
        for key in ("data", "validation_data", "init_from"):
            value = data.get(key)
            if (
                isinstance(value, str)
                and not value.startswith("hf:")
                and (not is_hub_id(value) or Path(value).expanduser().exists())  # a hub id means the same anywhere
            ):
                data[key] = value.replace("\\", "/").rsplit("/", 1)[-1]
        state_meta.write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")
