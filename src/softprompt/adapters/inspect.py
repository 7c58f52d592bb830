"""What is inside an adapter directory: method, base model, size, and what its virtual tokens resemble."""

from __future__ import annotations

from pathlib import Path

import torch

from softprompt.adapters.peft_format import (
    CONFIG_FILE,
    META_FILE,
    PEFT_TYPES,
    WEIGHTS_FILE,
    read_json,
    read_tensors,
    resolve_adapter_dir,
    verify_checksum,
)
from softprompt.errors import SoftPromptError


def inspect_adapter(path: str | Path, model=None, *, top_k: int = 3) -> dict:
    """Summarise an adapter. With ``model`` (a SoftPromptModel of its base), list for each virtual token
    the vocabulary tokens whose input embeddings are closest (cosine similarity); input methods only."""
    folder = resolve_adapter_dir(path)  # a local directory, or a hub id's files as load_adapter fetches them
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise SoftPromptError(f"--top-k: expected an integer of at least 1, got {top_k!r}")
    config = read_json(folder / CONFIG_FILE)
    meta = read_json(folder / META_FILE) if (folder / META_FILE).exists() else {}
    verify_checksum(folder, WEIGHTS_FILE, meta)
    tensors = read_tensors(folder / WEIGHTS_FILE)
    table = tensors.get("prompt_embeddings")
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    peft_type = config.get("peft_type")
    info = {
        "path": str(folder),
        "method": PEFT_TYPES.get(peft_type, peft_type) if isinstance(peft_type, str) else peft_type,
        "base_model": meta.get("base_model") or config.get("base_model_name_or_path"),
        "task_type": config.get("task_type"),
        # An adaption prompt's length is PEFT's adapter_len (per adapted layer).
        "num_virtual_tokens": config.get("num_virtual_tokens", config.get("adapter_len")),
        "parameters": sum(int(t.numel()) for t in tensors.values()),
        "num_tasks": config.get("num_tasks"),  # multitask adapters: requests name a task as NAME:TASK
        "adapter_bytes": files.get(WEIGHTS_FILE, 0),
        "files": files,
        "config": meta.get("config"),
        "nearest_tokens": None,
        "gates": _gates(tensors),
    }
    if model is not None and table is not None and config.get("peft_type") in ("PROMPT_TUNING", "P_TUNING"):
        vocab = model.base.get_input_embeddings().weight.detach().float()
        rows = table[: int(config["num_virtual_tokens"])].float().to(vocab.device)
        sims = torch.nn.functional.normalize(rows, dim=-1) @ torch.nn.functional.normalize(vocab, dim=-1).T
        best = sims.topk(min(top_k, sims.shape[-1]), dim=-1)  # at most the whole vocabulary
        info["nearest_tokens"] = [
            [
                {"token": model.tokenizer.decode([int(i)]), "id": int(i), "cosine": round(float(s), 4)}
                for s, i in zip(scores, ids)
            ]
            for scores, ids in zip(best.values, best.indices)
        ]
    return info


def _gates(tensors: dict[str, torch.Tensor]) -> list[float] | None:
    """Adaption prompts: each adapted layer's gate, bottom layer first (0 at the start: its prompt adds nothing)."""
    gates = {k: t for k, t in tensors.items() if k.endswith(".adaption_gate")}
    layer = {k: int(next(p for p in k.split(".") if p.isdigit())) for k in gates}
    return [round(float(gates[k].reshape(-1)[0]), 6) for k in sorted(gates, key=layer.__getitem__)] or None


def format_inspection(info: dict) -> str:
    lines = [
        f"adapter     {info['path']}",
        f"method      {info['method']}  ({info['task_type']})",
        f"base model  {info['base_model']}",
        f"size        {info['num_virtual_tokens']} virtual tokens, {info['parameters']:,} parameters, "
        f"weights {info['adapter_bytes'] / 1024:.1f} KiB",
        "files       " + ", ".join(f"{k} ({v / 1024:.1f} KiB)" for k, v in info["files"].items()),
    ]
    if info.get("num_tasks"):
        lines.append(
            f"tasks       {info['num_tasks']}, each the shared prompt times its own factor; a row names its task "
            "(task_ids, or NAME:TASK as the server's model)"
        )
    if info["nearest_tokens"]:
        lines.append("nearest vocabulary tokens per virtual token (cosine):")
        for i, near in enumerate(info["nearest_tokens"]):
            lines.append(f"  {i:3d}  " + "  ".join(f"{n['token']!r} {n['cosine']:.2f}" for n in near))
    elif info["gates"]:
        lines.append(
            f"adaption prompt in the top {len(info['gates'])} layers; gates "
            + ", ".join(f"{g:.4g}" for g in info["gates"])
        )
    elif info["method"] in ("prefix_tuning", "cartridge"):
        lines.append(
            f"{info['method'].replace('_', ' ')} stores keys/values per layer: "
            "its virtual tokens have no input embedding to compare"
        )
    return "\n".join(lines)
