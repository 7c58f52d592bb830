"""Short soak of the real server process on loopback (the quick form of ``python -m research.soak``).

`softprompt serve` runs as a child process on 127.0.0.1 (free port) with 6 adapters of all three methods
and room for only 4 in memory (so adapters are evicted and reloaded throughout). 24 concurrent clients
send mixed completions, streams, chats and classifications over all adapters and the base model for a
bounded time. Then a second server with ``--max-batch-size 1 --max-queue 4`` takes a burst of 40 long
requests. Full form (several minutes): ``.venv/bin/python -m research.soak --minutes 5``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `research` is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from research import soak  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return soak.prepare(tmp_path_factory.mktemp("soak"), adapters=6)


def test_mixed_load_on_loopback_has_no_errors_and_flat_memory(files):
    checkpoint, adapter_dir, names = files
    report = soak.soak(
        checkpoint,
        adapter_dir,
        names,
        seconds=12,
        clients=24,
        warmup_s=5,
        resident=4,
        log=lambda message: print(message),
    )
    print({k: v for k, v in report.items() if k != "rss_samples_mib"})
    assert report["requests"] >= 100 and report["ok"] == report["requests"], report["error_samples"]
    assert {"completion", "stream", "chat", "classify"} <= set(report["by_kind"])
    assert report["adapter_evictions"] >= 1  # the residency limit was exercised under load
    # Same invariants as the full form (RSS within 5% of its post-warm-up value, nothing left queued, no 5xx).
    assert soak.check_soak(report) == []


def test_a_burst_beyond_the_queue_gets_503_and_never_queues_more_than_the_bound(files):
    checkpoint, adapter_dir, names = files
    report = soak.queue_burst(checkpoint, adapter_dir, names, max_queue=4, burst=40, max_tokens=60)
    print(report)
    assert report["depth_polls"] >= 5  # the queue depth was watched during the burst
    assert report["max_queue_depth_seen"] <= 4
    assert report["rejected"] >= 1 and report["ok"] >= 1
    assert soak.check_burst(report) == []


def test_keep_alive_timeout_is_a_setting_passed_to_uvicorn(tmp_path, monkeypatch):
    """Behind a balancer the server's keep-alive must outlast the balancer's idle timeout: it is configurable."""
    import argparse

    import uvicorn

    from softprompt.cli.serve import add_arguments as add_serve_arguments
    from softprompt.cli.serve import run as cmd_serve
    from softprompt.errors import ConfigError
    from softprompt.server import ServerSettings

    from tiny import save_tiny_checkpoint

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs))
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    checkpoint = save_tiny_checkpoint("gpt2", tmp_path / "model")
    assert cmd_serve(parser.parse_args(["--model", checkpoint, "--keep-alive-s", "75"])) == 0
    assert seen["timeout_keep_alive"] == 75
    assert cmd_serve(parser.parse_args(["--model", checkpoint])) == 0
    assert seen["timeout_keep_alive"] == 5
    with pytest.raises(ConfigError, match="keep-alive"):
        ServerSettings(keep_alive_s=0).validate()
