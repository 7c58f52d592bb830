"""Many users' documents served at once: 8 cartridges and prompt-tuning adapters in one decoding batch, each row
exactly what it gives alone (issue 25's self-study serving)."""

import asyncio

import pytest

from softprompt.server.batcher import Batcher
from softprompt.server.jobs import Job, Sampling
from softprompt.server.metrics import Metrics
from softprompt.server.settings import ServerSettings

from serving import lively_model, offline_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; the cores are shared

DOCUMENTS = [
    "Port Lannis sits where the river Quell meets the sea.",
    "The ferry costs three coins and leaves at dawn.",
    "Invoice 4411: two crates of pears, paid in full.",
    "Chapter one: the lighthouse keeper counts the ships.",
    "def area(r): return 3.14159 * r * r",
    "Meeting notes: ship the cartridge server on Friday.",
]


def test_eight_cartridges_and_prompt_tuning_rows_in_one_batch_each_equal_its_solo_run(tmp_path):
    model = lively_model("llama")
    adapters = {}
    for i, document in enumerate(DOCUMENTS):  # cartridges started from different documents, of different lengths
        adapters[f"doc{i}"] = ("cartridge", {"num_virtual_tokens": 4 + 3 * i, "init_text": document})
    adapters["rand0"] = ("cartridge", {"num_virtual_tokens": 5, "num_frozen_tokens": 0, "init": "random"})
    adapters["rand1"] = ("cartridge", {"num_virtual_tokens": 9, "num_frozen_tokens": 2, "init": "random"})
    adapters["pt0"] = ("prompt_tuning", {"num_virtual_tokens": 4})
    adapters["pt1"] = ("prompt_tuning", {"num_virtual_tokens": 7})
    paths = {}
    for seed, (name, (method, options)) in enumerate(adapters.items()):
        model.add_adapter(name, method=method, seed=seed, **options)
        paths[name] = str(tmp_path / name)
        model.save_adapter(name, paths[name])
    server_model = offline_model(paths, "llama")  # the server's model reads the adapter files
    requests = [(name, f"Question {i}: what does it say?") for i, name in enumerate([*adapters, None])]
    solo = {
        (name, text): model.generate([text], adapters=[name], max_new_tokens=6, return_details=True)[0]
        for name, text in requests
    }
    metrics = Metrics()

    async def main():
        loop = asyncio.get_running_loop()
        # The batch waits until every request is queued, so all rows are prefilled and decoded together.
        batcher = Batcher(server_model, ServerSettings(max_batch_size=len(requests), batch_window_ms=20_000), metrics)
        batcher.start_thread()
        try:
            jobs = [
                Job(
                    loop,
                    adapter=name,
                    prompts=[server_model.tokenizer(text)["input_ids"]],
                    sampling=Sampling(max_new_tokens=6),
                )
                for name, text in requests
            ]
            for job in jobs:
                batcher.submit(job)
            return [(await asyncio.wait_for(job.future, 60))[0] for job in jobs]
        finally:
            batcher.stop_thread()

    results = asyncio.run(main())
    prefills = metrics.registry.get_sample_value("softprompt_batch_size_count", {"phase": "prefill"})
    rows = metrics.registry.get_sample_value("softprompt_batch_size_sum", {"phase": "prefill"})
    assert (prefills, rows) == (1, len(requests))  # one batch holding every row
    for request, got in zip(requests, results):
        want = solo[request]
        assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason), request
    assert len({r.text for r in results}) > len(results) // 2  # the rows really differ from one another
