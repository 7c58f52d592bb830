"""lm-evaluation-harness evaluates a served adapter: its ``local-completions`` model against a live `softprompt`
server agrees with its in-process ``hf`` model given the same adapter through PEFT (``peft=``).

Everything is local: a tiny random checkpoint with its tokenizer, an adapter saved by softprompt (PEFT's layout), and
a multiple-choice task written as a YAML file over a jsonl file in ``tmp_path``; lm-eval's own Python API runs both
(`lm_eval.simple_evaluate` with ``log_samples=True``, so rows are compared one by one).
"""

from __future__ import annotations

import json
import logging

import pytest
import transformers

from softprompt import SoftPromptModel
from softprompt.server import ServerSettings, create_app

from serving import ServerThread, lively_model
from tiny import tiny_tokenizer

lm_eval = pytest.importorskip("lm_eval")  # a dev dependency: lm-eval[api]==0.4.13
TaskManager = pytest.importorskip("lm_eval.tasks").TaskManager


TASK = "softprompt_tiny_mc"
METHODS = {"pt": "prompt_tuning", "prefix": "prefix_tuning"}  # adapter name -> method
ROWS = [  # question, choices, answer: 8 rows x 3 choices = 24 requests, one batch of 20 and one of 4
    ("The sky is", ["blue", "green", "loud"], 0),
    ("Two plus two is", ["four", "five", "a fish"], 0),
    ("Water is", ["wet", "dry", "square"], 0),
    ("Fire is", ["hot", "cold", "purple"], 0),
    ("Cats say", ["meow", "moo", "quack"], 0),
    ("Snow is", ["white", "black", "angry"], 0),
    ("The sun rises in the", ["east", "west", "fridge"], 0),
    ("Bees make", ["honey", "bricks", "music"], 0),
]


def write_task(root) -> str:
    """A multiple-choice task over a local jsonl file; returns its folder (for ``TaskManager(include_path=)``)."""
    data = root / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ROWS))
    folder = root / "tasks"
    folder.mkdir()
    (folder / "tiny_mc.yaml").write_text(f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
target_delimiter: " "
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return str(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    checkpoint = root / "checkpoint"
    trained = lively_model("llama")  # the base everyone loads from disk: the server, and lm-eval's hf model
    trained.base.save_pretrained(checkpoint)
    tiny_tokenizer().save_pretrained(checkpoint)
    adapters = {}
    for seed, (name, method) in enumerate(METHODS.items(), start=3):
        trained.add_adapter(name, method=method, seed=seed, num_virtual_tokens=4)
        adapters[name] = str(root / name)
        trained.save_adapter(name, adapters[name])
    return {"root": root, "checkpoint": str(checkpoint), "adapters": adapters, "tasks": write_task(root)}


def evaluate(setup, model: str, model_args: dict) -> dict:
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=setup["tasks"]),
        log_samples=True,
        bootstrap_iters=0,
        verbosity="WARNING",
    )


def per_row(output: dict) -> dict[int, list[float]]:
    """doc id -> the log-likelihood of each choice."""
    return {s["doc_id"]: [resp[0] for resp in s["filtered_resps"]] for s in output["samples"][TASK]}


@pytest.mark.parametrize("adapter", list(METHODS))
def test_lm_eval_through_the_server_matches_lm_eval_with_peft(setup, adapter, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    base = transformers.AutoModelForCausalLM.from_pretrained(setup["checkpoint"])
    served = SoftPromptModel(base, tiny_tokenizer(), name_or_path="tiny-llama")
    # Every adapter served (the default --max-inputs): lm-eval's batch of 20 prompts is one request.
    settings = ServerSettings(adapters=setup["adapters"], batch_window_ms=0)
    with ServerThread(create_app(served, settings)) as server:
        remote = evaluate(
            setup,
            "local-completions",
            {
                "model": adapter,
                "base_url": f"{server.url}/v1/completions",
                "tokenizer_backend": "huggingface",
                "tokenizer": setup["checkpoint"],
                "batch_size": 20,
                "max_retries": 1,
                "num_concurrent": 1,
            },
        )
    local = evaluate(
        setup,
        "hf",
        {
            "pretrained": setup["checkpoint"],
            "peft": setup["adapters"][adapter],
            "device": "cpu",
            "dtype": "float32",
            "batch_size": 8,
        },
    )

    remote_rows, local_rows = per_row(remote), per_row(local)
    assert sorted(remote_rows) == list(range(len(ROWS)))
    for doc, scores in local_rows.items():
        assert remote_rows[doc] == pytest.approx(scores, abs=1e-3), doc
    assert remote["results"][TASK]["acc,none"] == local["results"][TASK]["acc,none"]
    # The adapter is in play: the base model alone scores the rows differently.
    base_rows = setup.get("base_rows")
    if base_rows is None:
        base_rows = setup["base_rows"] = per_row(
            evaluate(
                setup, "hf", {"pretrained": setup["checkpoint"], "device": "cpu", "dtype": "float32", "batch_size": 8}
            )
        )
    assert any(abs(a - b) > 1e-2 for doc in local_rows for a, b in zip(local_rows[doc], base_rows[doc]))
