"""The batcher on the static decode path (`softprompt.engine.static_decode`): rows that join a running slot pool,
grow it and leave it give what each gives alone on the eager path."""

import asyncio

import pytest

from softprompt.engine import static_decode
from softprompt.server.batcher import Batcher
from softprompt.server.jobs import Job, Sampling
from softprompt.server.settings import ServerSettings

from serving import lively_model


async def _until_decoding(batcher, timeout=30):
    deadline = asyncio.get_running_loop().time() + timeout
    while batcher.running_rows == 0:
        assert asyncio.get_running_loop().time() < deadline, "nothing started decoding"
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rows_joining_a_slot_pool_equal_each_alone_on_the_eager_path(family, monkeypatch):
    monkeypatch.setattr(static_decode, "MIN_CAPACITY", 16)  # so that joining and long rows grow the pool
    model = lively_model(family)
    model.add_adapter("a", method="prompt_tuning", num_virtual_tokens=4, seed=1)
    model.add_adapter("b", method="prefix_tuning", num_virtual_tokens=3, seed=2)
    model.add_adapter("m", method="multitask_prompt_tuning", num_virtual_tokens=2, num_tasks=2, num_ranks=1, seed=3)
    first = ("The first prompt", "a", 6)
    later = [
        ("hi", "b", 30),  # passes the pool's capacity
        ("Another, longer prompt than the first one", None, 9),  # wider than the pool: it grows on joining
        ("x y z", "m:1", 5),
        ("q", "a", 3),
    ]
    model.decode = "eager"
    expected = {
        text: model.generate([text], adapters=[adapter], max_new_tokens=n, return_details=True)[0]
        for text, adapter, n in [first] + later
    }
    model.decode = "static"
    started, original = [], static_decode.start

    def start(*args, **kwargs):
        started.append(original(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(static_decode, "start", start)

    async def main():
        loop = asyncio.get_running_loop()
        batcher = Batcher(model, ServerSettings(max_batch_size=8, batch_window_ms=0))
        batcher.start_thread()
        try:
            jobs = {}
            for i, (text, adapter, n) in enumerate([first] + later):
                ids = model.tokenizer(text)["input_ids"]
                jobs[text] = Job(loop, adapter=adapter, prompts=[ids], sampling=Sampling(max_new_tokens=n))
                batcher.submit(jobs[text])
                if i == 0:
                    await _until_decoding(batcher)  # the others join mid-flight
            results = {text: (await asyncio.wait_for(job.future, 60))[0] for text, job in jobs.items()}
            return results, dict(batcher.stats)
        finally:
            batcher.stop_thread()

    results, stats = asyncio.run(main())
    for text, want in expected.items():
        got = results[text]
        assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason), text
    assert stats["merged"] >= 1, stats
    assert started and all(isinstance(s, static_decode.SlotState) for s in started)
    assert max(s.pool.capacity for s in started) > 16  # the pool grew
