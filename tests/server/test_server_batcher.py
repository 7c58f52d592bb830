"""The batcher without HTTP: rows joining a running batch mid-decode give exactly what offline generation gives.

Causal families with plain caches merge new rows into the running cache (left-padded, masked); sliding-window
(Gemma3) and encoder-decoder (T5) models run joined rows as separate groups. Both paths are checked here.
"""

import asyncio

import pytest

from softprompt.engine.tokens import encode_texts
from softprompt.server.batcher import Batcher
from softprompt.server.jobs import Job, Sampling
from softprompt.server.settings import ServerSettings

from serving import lively_model

PATHS = {"gpt2": "merged", "llama": "merged", "bloom": "merged", "gemma3": "separate", "t5": "separate"}


def _ids(model, text):
    return model.tokenizer(text)["input_ids"]


async def _until_decoding(batcher, timeout=30):
    """Wait until the batcher has rows in its running batch."""
    deadline = asyncio.get_running_loop().time() + timeout
    while batcher.running_rows == 0:
        assert asyncio.get_running_loop().time() < deadline, "nothing started decoding"
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("family", list(PATHS))
def test_rows_joining_mid_decode_equal_offline(family):
    model = lively_model(family)
    model.add_adapter("a", method="prompt_tuning", num_virtual_tokens=4, seed=1)
    model.add_adapter("b", method="prefix_tuning", num_virtual_tokens=3, seed=2)
    first = ("The first prompt, a long one to begin", "a", 14)
    later = [("hi", "b", 6), ("Another prompt here", None, 9), ("x y z", "a", 5)]
    expected = {}
    for text, adapter, n in [first] + later:
        expected[text] = model.generate([text], adapters=[adapter], max_new_tokens=n, return_details=True)[0]

    async def main():
        loop = asyncio.get_running_loop()
        batcher = Batcher(model, ServerSettings(max_batch_size=8, batch_window_ms=0))
        batcher.start_thread()
        try:
            text, adapter, n = first
            lead = Job(loop, adapter=adapter, prompts=[_ids(model, text)], sampling=Sampling(max_new_tokens=n))
            batcher.submit(lead)
            await _until_decoding(batcher)  # the lead row is decoding now: the others join mid-flight
            jobs = {}
            for text, adapter, n in later:
                jobs[text] = Job(
                    loop, adapter=adapter, prompts=[_ids(model, text)], sampling=Sampling(max_new_tokens=n)
                )
                batcher.submit(jobs[text])
            results = {text: (await asyncio.wait_for(job.future, 30))[0] for text, job in jobs.items()}
            results[first[0]] = (await asyncio.wait_for(lead.future, 30))[0]
            return results, dict(batcher.stats)
        finally:
            batcher.stop_thread()

    results, stats = asyncio.run(main())
    for text, want in expected.items():
        got = results[text]
        assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason), text
    assert stats[PATHS[family]] >= 1, stats  # the joining rows took the expected path


def test_multi_prompt_job_sampling_stop_and_cancel():
    model = lively_model("gpt2")
    model.add_adapter("a", method="p_tuning", num_virtual_tokens=3, seed=3)
    prompts = ["alpha", "beta gamma", "delta"]
    greedy = model.generate(prompts, adapters="a", max_new_tokens=10, return_details=True)
    sampled = [
        model.generate([p], adapters=["a"], max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9, seed=5)[0]
        for p in prompts
    ]
    stop = greedy[0].text[2:4]
    stopped = model.generate([prompts[0]], adapters=["a"], max_new_tokens=10, stop=[stop], return_details=True)[0]

    async def main():
        loop = asyncio.get_running_loop()
        batcher = Batcher(model, ServerSettings(max_batch_size=4, batch_window_ms=1))
        batcher.start_thread()
        try:
            ids = [_ids(model, p) for p in prompts]
            g = Job(loop, adapter="a", prompts=ids, sampling=Sampling(max_new_tokens=10))
            s = Job(
                loop, adapter="a", prompts=ids, sampling=Sampling(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=5)
            )
            cut = Job(
                loop, adapter="a", prompts=ids[:1], sampling=Sampling(max_new_tokens=10, stop=[stop]), stream=True
            )
            gone = Job(loop, adapter="a", prompts=ids[:1], sampling=Sampling(max_new_tokens=200))
            for job in (g, s, cut, gone):
                batcher.submit(job)
            gone.cancel()
            out = [await asyncio.wait_for(j.future, 30) for j in (g, s, cut)]
            with pytest.raises(Exception, match="closed"):
                await asyncio.wait_for(gone.future, 30)
            streamed = []
            while not cut.events.empty():
                event = cut.events.get_nowait()
                if event[0] == "delta":
                    streamed.append(event[2])
            return out, "".join(streamed), batcher.running_rows
        finally:
            batcher.stop_thread()

    (g, s, cut), streamed, running = asyncio.run(main())
    assert [r.text for r in g] == [r.text for r in greedy]
    assert [r.text for r in s] == sampled
    assert (cut[0].text, cut[0].finish_reason) == (stopped.text, "stop") and stop not in cut[0].text
    assert streamed == cut[0].text
    assert running == 0  # the cancelled 200-token row left the batch


def test_queue_bound_and_stop_fail_waiting_jobs():
    model = lively_model("gpt2")
    ids, _ = encode_texts(model.tokenizer, ["q"])

    async def main():
        loop = asyncio.get_running_loop()
        batcher = Batcher(model, ServerSettings(max_batch_size=1, max_queue=2, retry_after_s=3))
        # Not started: nothing is admitted, so the queue fills deterministically.
        batcher._thread = type("T", (), {"is_alive": lambda self: True})()
        jobs = [
            Job(loop, adapter=None, prompts=[ids[0].tolist()], sampling=Sampling(max_new_tokens=2)) for _ in range(3)
        ]
        batcher.submit(jobs[0])
        batcher.submit(jobs[1])
        with pytest.raises(Exception) as info:
            batcher.submit(jobs[2])
        return info.value, batcher.queue_depth

    error, depth = asyncio.run(main())
    assert error.status == 503 and error.headers["Retry-After"] == "3" and error.code == "queue_full"
    assert depth == 2


def test_a_job_larger_than_the_batch_joins_in_parts_and_n_choices_are_seeded_one_by_one():
    model = lively_model("gpt2")
    model.add_adapter("a", method="prompt_tuning", num_virtual_tokens=3, seed=4)
    prompts = [f"prompt {i}" for i in range(7)]
    greedy = model.generate(prompts, adapters="a", max_new_tokens=6)
    sampled = [
        model.generate(["prompt 0"], adapters=["a"], max_new_tokens=6, do_sample=True, seed=9 + j)[0] for j in range(3)
    ]

    async def main():
        loop = asyncio.get_running_loop()
        batcher = Batcher(model, ServerSettings(max_batch_size=3, batch_window_ms=0))
        batcher.start_thread()
        try:
            ids = [_ids(model, p) for p in prompts]
            big = Job(loop, adapter="a", prompts=ids, sampling=Sampling(max_new_tokens=6))  # 7 rows, 3 slots
            many = Job(
                loop, adapter="a", prompts=ids[:1], n=3, sampling=Sampling(max_new_tokens=6, temperature=1.0, seed=9)
            )
            gone = Job(loop, adapter="a", prompts=ids, sampling=Sampling(max_new_tokens=50))
            after = Job(loop, adapter=None, prompts=ids[:2], sampling=Sampling(max_new_tokens=2))
            for job in (big, many, gone):
                batcher.submit(job)
            big_out = await asyncio.wait_for(big.future, 30)
            gone.cancel()  # possibly part-admitted: its running rows leave, its waiting rows never join
            batcher.submit(after)
            many_out = await asyncio.wait_for(many.future, 30)
            with pytest.raises(Exception, match="closed"):
                await asyncio.wait_for(gone.future, 30)
            after_out = await asyncio.wait_for(after.future, 30)
            await asyncio.sleep(0.05)
            return big_out, many_out, after_out, batcher.running_rows, batcher.queue_depth, batcher._pending_rows
        finally:
            batcher.stop_thread()

    big_out, many_out, after_out, running, depth, pending_rows = asyncio.run(main())
    assert [r.text for r in big_out] == greedy
    assert [r.text for r in many_out] == sampled
    assert len(after_out) == 2 and (running, depth, pending_rows) == (0, 0, 0)
