"""A small fork server for the peak-memory measurements: ``python -m research.memserver``.

It imports the libraries once and runs no compute itself. For each JSON spec read from stdin it forks
a child, which loads the model, measures (`research.training.measure_memory`) and writes the result back;
so every measurement runs in a fresh process whose memory history holds nothing but its own config,
without paying the library imports each time. One result line per spec, prefixed with ``MARK``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

MARK = "BENCH-MEM "
REPO = Path(__file__).resolve().parents[1]


def _child(spec: dict, fd: int) -> None:
    try:
        from .training import measure_memory

        result = {"ok": measure_memory(spec)}
    except BaseException:
        result = {"error": traceback.format_exc()}
    data = json.dumps(result).encode()
    while data:
        data = data[os.write(fd, data) :]
    os.close(fd)


def serve() -> None:
    from . import harness

    harness.quiet()
    # The imports every child shares, done once here: torch, transformers (and its Llama classes), peft.
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import softprompt  # noqa: F401

    from . import training  # noqa: F401

    for line in sys.stdin:
        if not line.strip():
            continue
        spec = json.loads(line)
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            _child(spec, write)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        os.close(write)
        chunks = []
        while chunk := os.read(read, 1 << 16):
            chunks.append(chunk)
        os.close(read)
        _, status = os.waitpid(pid, 0)
        text = b"".join(chunks).decode() or json.dumps({"error": f"child exited with status {status}"})
        print(MARK + text.replace("\n", " "), flush=True)


class MemoryServer:
    """Parent side: ``with MemoryServer() as server: server.measure(spec)``."""

    def __enter__(self) -> MemoryServer:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "research.memserver"],
            cwd=REPO,
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        return self

    def measure(self, spec: dict) -> dict:
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(MARK):
                result = json.loads(line[len(MARK) :])
                if "error" in result:
                    raise RuntimeError(f"memory measurement failed for {spec.get('system')}: {result['error']}")
                return result["ok"]
        raise RuntimeError(f"memory server exited (status {self.proc.wait()})")

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


if __name__ == "__main__":
    serve()
