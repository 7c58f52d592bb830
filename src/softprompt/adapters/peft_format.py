"""Adapters on disk, in PEFT's file layout (both ways), plus softprompt's own extras.

An adapter directory holds:

* ``adapter_config.json`` and ``adapter_model.safetensors`` (key ``prompt_embeddings``, and any tensors a
  method saves beside it, e.g. multitask prompt tuning's task factors): exactly what PEFT writes, so ``peft.PeftModel.from_pretrained`` loads our adapters and we load PEFT's;
* ``softprompt.json``: our full method config, the base model's shape and a checksum of the weights;
* ``training_state.safetensors`` / ``training_state.json`` (optional): reparameterisation weights,
  optimizer state and step, so training resumes from a saved adapter (PEFT cannot).

Loading never unpickles anything: weights are read with safetensors only, and ``trust_remote_code``
in an adapter file is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub  # snapshot_download is looked up at call time, so a stand-in can replace it (the tests do)
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from softprompt import __version__
from softprompt.adapters.training_format import TrainingFormat
from softprompt.engine.families import ModelShape
from softprompt.errors import AdapterMismatchError, SoftPromptError
from softprompt.fileio import atomic_directory, recover_directory, sha256_file
from softprompt.methods import PEFT_TYPES, SoftPromptMethod, method_class
from softprompt.models.names import hub_id_for
from softprompt.options import OptionError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "softprompt.json"
STATE_FILE = "training_state.safetensors"
STATE_META_FILE = "training_state.json"
MAX_JSON_BYTES = 16 * 1024**2  # adapter JSON files are a few KiB; a bigger one is not an adapter file
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt", "adapter_model.pth")


def _task_type(shape: ModelShape) -> str:
    return "SEQ_2_SEQ_LM" if shape.is_encoder_decoder else "CAUSAL_LM"


def peft_config(model, adapter: SoftPromptMethod) -> dict:
    """PEFT's ``adapter_config.json`` for an adapter of ``model``."""
    shape = model.shape
    kv = adapter.adds == "kv"
    common = {
        "peft_type": adapter.config.peft_type,
        "task_type": _task_type(shape),
        "base_model_name_or_path": hub_id_for(model.name_or_path),
        "inference_mode": True,
        "auto_mapping": None,
        "revision": None,
    }
    if adapter.adds == "gated":  # not prompt learning in PEFT: none of its virtual-token fields
        return {**common, **adapter.peft_config_fields()}
    config = {
        **common,
        "num_virtual_tokens": adapter.num_virtual_tokens,
        "token_dim": shape.prefix_token_dim if kv else shape.hidden_size,
        "num_layers": shape.num_layers,
        "num_attention_heads": shape.prefix_heads if kv else shape.num_attention_heads,
        "num_transformer_submodules": adapter.submodules,
        "modules_to_save": None,
        **adapter.peft_config_fields(),
    }
    if config.get("prompt_tuning_init") == "TEXT" and not config.get("tokenizer_name_or_path"):
        # PEFT refuses a TEXT init without a tokenizer path (it only reads it when training anew).
        config["tokenizer_name_or_path"] = config["base_model_name_or_path"]
    return config


def save_adapter(
    model,
    name: str,
    path: str | Path,
    *,
    training_state: dict[str, torch.Tensor] | None = None,
    training_meta: dict | None = None,
) -> Path:
    """Write adapter ``name`` to ``path`` atomically. Other files already in ``path`` are kept."""
    adapter = model.get_adapter(name)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SoftPromptError(f"{path}: exists and is not a directory; choose another output path")
    with atomic_directory(path) as tmp:
        if path.is_dir():  # keep what else lives there (metrics, plots, checkpoints)
            for child in path.iterdir():
                if child.name in (CONFIG_FILE, WEIGHTS_FILE, META_FILE, STATE_FILE, STATE_META_FILE):
                    continue
                if child.is_symlink():  # kept as a link: never follow one into what it points at
                    (tmp / child.name).symlink_to(child.readlink())
                elif child.is_dir():
                    shutil.copytree(child, tmp / child.name, symlinks=True)
                else:
                    shutil.copy2(child, tmp / child.name)
        tensors = {k: v.float().cpu().contiguous() for k, v in adapter.peft_tensors().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(peft_config(model, adapter), f, indent=2, sort_keys=True)
        beyond = _state_beyond_table(adapter, list(tensors.values()))
        state = {f"adapter.{k}": v.float().cpu().contiguous() for k, v in beyond.items()}
        state.update({k: v.cpu().contiguous() for k, v in (training_state or {}).items()})
        save_file(state, str(tmp / STATE_FILE), metadata={"format": "pt"})
        if training_meta is not None:
            with open(tmp / STATE_META_FILE, "w") as f:
                json.dump(training_meta, f, indent=2, sort_keys=True, default=str)
        meta = {
            "softprompt_version": __version__,
            "name": name,
            "method": adapter.config.method,
            "config": adapter.config.to_dict(),
            "base_model": model.name_or_path,
            "shape": model.shape.__dict__,
            "sha256": {WEIGHTS_FILE: sha256_file(tmp / WEIGHTS_FILE), STATE_FILE: sha256_file(tmp / STATE_FILE)},
        }
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
    return path


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is shaped like a hub repo id (``owner/name``) rather than a local path."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~"))


def resolve_adapter_dir(path: str | Path) -> Path:
    """The local directory of an adapter: ``path`` itself, or a hub id's files, downloaded (and cached)."""
    local = Path(path).expanduser()
    recover_directory(local)  # a save that a crash interrupted midway
    if local.exists():
        if not local.is_dir():
            raise SoftPromptError(f"{local}: expected an adapter directory (with {CONFIG_FILE}), got a file")
        return local
    text = str(path)
    if is_hub_id(text):
        try:
            return Path(
                huggingface_hub.snapshot_download(
                    text, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, META_FILE, STATE_FILE, STATE_META_FILE]
                )
            )
        except Exception as exc:  # network, auth or missing repo: one clear message
            raise SoftPromptError(
                f"adapter {text!r}: no such local directory, and the hub download failed ({exc.__class__.__name__})"
            ) from None
    raise SoftPromptError(f"{local}: no such adapter directory")


def read_json(file: Path) -> dict:
    if file.is_dir():
        raise SoftPromptError(f"{file}: is a directory; expected a JSON file")
    if not file.is_file():
        raise SoftPromptError(f"{file}: missing (an adapter directory needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    if file.stat().st_size > MAX_JSON_BYTES:
        raise SoftPromptError(
            f"{file}: is {file.stat().st_size:,} bytes, too large for an adapter file (at most {MAX_JSON_BYTES:,})"
        )
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SoftPromptError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise SoftPromptError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; anything else (pickles included) is refused with a clear message."""
    if file.is_dir():
        raise SoftPromptError(f"{file}: is a directory; expected a safetensors file")
    if not file.is_file():
        for pickled in PICKLE_FILES:
            if (file.parent / pickled).exists():
                raise SoftPromptError(
                    f"{file.parent / pickled}: pickled weights are never loaded (they can run code); "
                    f"convert them to {file.name} with safetensors"
                )
        raise SoftPromptError(f"{file}: missing")
    try:
        with safe_open(str(file), framework="pt") as f:
            names = f.keys()  # safe_open is not iterable: keys() is how it lists its tensors
            return {key: f.get_tensor(key) for key in names}
    except Exception as exc:
        raise SoftPromptError(f"{file}: not a readable safetensors file (truncated or corrupt: {exc})") from None


def verify_checksum(folder: Path, file_name: str, meta: dict) -> None:
    """Raise unless ``folder/file_name`` has the sha256 that ``softprompt.json`` recorded (if it recorded one)."""
    sums = meta.get("sha256") if isinstance(meta, dict) else None
    expected = sums.get(file_name) if isinstance(sums, dict) else None
    file = Path(folder) / file_name
    if expected and file.is_file() and sha256_file(file) != expected:
        raise SoftPromptError(f"{file}: checksum does not match {META_FILE}; the file is corrupt or was changed")


def _check(file: Path, what: str, found, expected, trained_on: str | None = None) -> None:
    if found != expected:
        hint = f" (it was trained on {trained_on})" if trained_on else ""
        raise AdapterMismatchError(
            f"{file}: adapter made for a model with {what} {found}, this model has {expected}{hint}"
        )


def _state_beyond_table(adapter: SoftPromptMethod, saved: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's own training state, or nothing when the weights file (``saved``, in order) holds it exactly.

    Without a reparameterisation (prompt tuning, prefix tuning without MLP) the trainable table *is* the
    materialised one; a second copy would double every saved adapter (900 KiB for a 20-token prefix on
    a 135M model) and resuming loads it from the weights file all the same.
    """
    state = adapter.training_state()
    if len(state) == len(saved) and all(
        s.shape == t.shape and torch.equal(s.float().cpu(), t) for s, t in zip(state.values(), saved)
    ):
        return {}
    return state


def read_peft_config(config_file: Path) -> dict:
    """PEFT's ``adapter_config.json``, checked: a JSON object of a known ``peft_type``, without trust_remote_code."""
    peft = read_json(config_file)
    if "trust_remote_code" in json.dumps(peft):
        raise SoftPromptError(
            f"{config_file}: asks for trust_remote_code, which softprompt never takes from an adapter file"
        )
    peft_type = peft.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise SoftPromptError(
            f"{config_file}: unknown method peft_type={peft_type!r}; expected one of {', '.join(PEFT_TYPES)}"
        )
    return peft


def check_adapter_dir(path: str | Path) -> None:
    """Raise the error `load_adapter` would for a local adapter directory that cannot load, without a model.

    Commands call this before loading the base model, so a mistyped ``--adapter`` fails in a second instead
    of after the weights load. What needs the model (layer count, widths) is still checked at load; a hub id
    that is not a local directory is downloaded (and checked) at load too.
    """
    if not Path(path).expanduser().exists() and is_hub_id(str(path)):
        return
    folder = resolve_adapter_dir(path)
    read_peft_config(folder / CONFIG_FILE)
    if not (folder / WEIGHTS_FILE).is_file():
        read_tensors(folder / WEIGHTS_FILE)  # raises: the pickle refusal or "missing"


def read_adapter(path: str | Path, shape: ModelShape, *, resume: bool = False) -> SoftPromptMethod:
    """Read an adapter directory (ours or PEFT's; a hub id is downloaded) and check it fits a model of ``shape``.

    No model is needed and nothing is registered anywhere, so this is safe on any thread (the server reads
    adapters on a worker thread while the model keeps decoding). The adapter is on the CPU. ``resume=True``
    also restores reparameterisation weights from the training state, so training can continue exactly;
    otherwise the adapter is the materialised table PEFT would use.
    """
    return _read(resolve_adapter_dir(path), shape, resume)[0]


def load_adapter(model, path: str | Path, name: str | None = None, *, resume: bool = False) -> SoftPromptMethod:
    """`read_adapter` for ``model`` and register it under ``name`` (default: the name it was saved under, else
    the directory's name), replacing an adapter of that name. Returns it, on the model's device."""
    folder = resolve_adapter_dir(path)
    adapter, meta = _read(folder, model.shape, resume)
    name = name or meta.get("name") or folder.name
    if name in model.adapters:
        model.remove_adapter(name)
    model.check_new_name(name)
    return model.register(name, adapter)


def _read(folder: Path, shape: ModelShape, resume: bool) -> tuple[SoftPromptMethod, dict]:
    """The adapter in ``folder`` (checked against ``shape``) and its ``softprompt.json`` (empty for PEFT's)."""
    config_file = folder / CONFIG_FILE
    peft = read_peft_config(config_file)
    meta = read_json(folder / META_FILE) if (folder / META_FILE).exists() else {}
    cls = method_class(PEFT_TYPES[peft["peft_type"]])
    _check(config_file, "task_type", peft.get("task_type"), _task_type(shape))
    try:
        fields = cls.config_from_peft(peft)
        gated = cls.adds == "gated"  # PEFT's per-layer tensors, not prompt learning's table
        n = 0 if gated else int(peft["num_virtual_tokens"])
        if meta.get("config") and meta.get("method") == cls.config_class.method:
            if not isinstance(meta["config"], dict):
                raise SoftPromptError(
                    f"{folder / META_FILE}: 'config' must be a JSON object, got {type(meta['config']).__name__}"
                )
            fields = {k: v for k, v in meta["config"].items() if k != "method"}
            config = cls.config_class.from_dict(fields, source=str(folder / META_FILE))
        else:
            try:
                config = cls.config_class.from_dict(fields, source=str(config_file))
            except OptionError as exc:  # a field's value (CPT's masks of another length, ...): name the file
                raise exc.renamed(f"{config_file}: {exc.where}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SoftPromptError(f"{config_file}: missing or malformed field ({exc})") from None
    kv = cls.adds == "kv"
    base = meta.get("base_model") or peft.get("base_model_name_or_path")  # named in a mismatch error
    base = base if isinstance(base, str) and base else None
    if not gated:
        _check(config_file, "layers (num_layers)", peft.get("num_layers"), shape.num_layers, base)
        _check(
            config_file,
            "token width (token_dim)",
            peft.get("token_dim"),
            shape.prefix_token_dim if kv else shape.hidden_size,
            base,
        )
    if kv:
        _check(
            config_file,
            "key/value heads (num_attention_heads)",
            peft.get("num_attention_heads"),
            shape.prefix_heads,
            base,
        )
    saved_shape = meta.get("shape")
    if isinstance(saved_shape, dict) and isinstance(saved_shape.get("vocab_size"), int):
        # Same width and depth but another vocabulary: another base model, whose embeddings mean other things.
        _check(
            folder / META_FILE, "vocabulary size (shape.vocab_size)", saved_shape["vocab_size"], shape.vocab_size, base
        )
    weights_file = folder / WEIGHTS_FILE
    verify_checksum(folder, WEIGHTS_FILE, meta)
    tensors = read_tensors(weights_file)
    adapter = cls(config, shape)
    if not gated:
        if "prompt_embeddings" not in tensors:
            found = ", ".join(tensors) or "none"
            raise SoftPromptError(f"{weights_file}: no 'prompt_embeddings' tensor (found: {found})")
        table = tensors["prompt_embeddings"]
        submodules = 2 if shape.is_encoder_decoder else 1
        expected = (n, shape.num_layers * 2 * shape.prefix_token_dim) if kv else (n * submodules, shape.hidden_size)
        _check(weights_file, "prompt_embeddings shape", tuple(table.shape), expected)
        adapter.load_materialized(table)
    adapter.load_peft_tensors(tensors, str(weights_file))
    if resume:
        state_file = folder / STATE_FILE
        if state_file.exists():
            verify_checksum(folder, STATE_FILE, meta)
            state = read_tensors(state_file)
            own = {k[len("adapter.") :]: v for k, v in state.items() if k.startswith("adapter.")}
            if own:
                fresh = cls(config, shape)
                fresh.load_training_state(own)
                adapter = fresh
    state_meta = folder / STATE_META_FILE
    adapter.training_format = TrainingFormat.from_meta(read_json(state_meta)) if state_meta.exists() else None
    return adapter, meta


def read_training_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The training-state tensors (optimizer etc., adapter weights excluded) and metadata of an adapter
    (a local directory, or a hub id whose files ``load_adapter`` fetched; empty where there are none)."""
    folder = Path(path).expanduser()
    if not folder.exists() and is_hub_id(str(path)):
        folder = resolve_adapter_dir(path)  # the hub cache: the same download load_adapter made
    recover_directory(folder)
    if (folder / STATE_FILE).exists() and (folder / META_FILE).exists():
        verify_checksum(folder, STATE_FILE, read_json(folder / META_FILE))
    tensors = read_tensors(folder / STATE_FILE) if (folder / STATE_FILE).exists() else {}
    meta = read_json(folder / STATE_META_FILE) if (folder / STATE_META_FILE).exists() else {}
    return {k: v for k, v in tensors.items() if not k.startswith("adapter.")}, meta
