"""Multitask prompt tuning (PEFT's MULTITASK_PROMPT_TUNING): parity with PEFT per task, files both ways, tasks per
row in mixed batches, source inits, training with a task column, the server's NAME:TASK models, bad input."""

import copy
import json

import httpx
import pytest
import torch
from peft import MultitaskPromptTuningConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file, save_file
from test_parity_peft import INPUT, MASK

from softprompt import SoftPromptModel
from softprompt.adapters.peft_format import CONFIG_FILE, STATE_FILE, WEIGHTS_FILE
from softprompt.cli.app import main
from softprompt.engine.generation import GenerationConfig, generate_batch
from softprompt.engine.tokens import pad_batch
from softprompt.errors import ConfigError, SoftPromptError
from softprompt.server import ServerSettings, create_app
from softprompt.training.config import load_config
from softprompt.training.loop import train

from serving import ServerThread, lively_model, offline_model, run_concurrently
from tiny import CAUSAL, FAMILIES, save_tiny_checkpoint, tiny_base, tiny_model, tiny_tokenizer
from toy_data import Interrupt, toy_rows, write_csv

N_TOKENS, N_TASKS, N_RANKS = 5, 3, 2
TASKS = torch.tensor([2, 0])  # one task per row of INPUT


def decoder_ids(family):
    return torch.tensor([[0, 33, 44, 55], [0, 34, 45, 56]]) if family == "t5" else None


def peft_pair(family, tmp_path):
    """A PEFT multitask adapter (saved by PEFT, reloaded) and ours loaded from PEFT's files."""
    base = tiny_base(family)
    task = TaskType.SEQ_2_SEQ_LM if family == "t5" else TaskType.CAUSAL_LM
    torch.manual_seed(1)
    config = MultitaskPromptTuningConfig(
        task_type=task, num_virtual_tokens=N_TOKENS, num_tasks=N_TASKS, num_ranks=N_RANKS
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # task factors of order 1, so every task's prompt differs clearly
        for name, p in peft_model.prompt_encoder.named_parameters():
            p.mul_(0.5 if "embedding" in name else 25.0)
    peft_model.save_pretrained(tmp_path / "peft")
    peft_loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    ours = SoftPromptModel(copy.deepcopy(base), tiny_tokenizer(), name_or_path=f"tiny-{family}")
    ours.load_adapter(str(tmp_path / "peft"), name="m")
    return peft_loaded, ours


def peft_logits(peft_model, family, tasks=TASKS):
    with torch.no_grad():
        if family == "t5":
            return peft_model(
                input_ids=INPUT, attention_mask=MASK, decoder_input_ids=decoder_ids(family), task_ids=tasks
            ).logits
        return peft_model(input_ids=INPUT, attention_mask=MASK, task_ids=tasks).logits[:, N_TOKENS:]


@pytest.mark.parametrize("family", CAUSAL)
def test_peft_adapter_loads_with_its_logits_and_loss_per_task(family, tmp_path):
    peft_model, ours = peft_pair(family, tmp_path)
    with torch.no_grad():
        got = ours(INPUT, MASK, adapters="m", task_ids=TASKS, decoder_input_ids=decoder_ids(family)).logits
        by_key = ours(INPUT, MASK, adapters=["m:2", "m:0"], decoder_input_ids=decoder_ids(family)).logits
    expected = peft_logits(peft_model, family)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(by_key, got)
    other = peft_logits(peft_model, family, torch.tensor([1, 1]))
    assert not torch.allclose(other, expected, atol=1e-3)  # the task matters
    labels = torch.tensor([[33, 44, 55, 66], [34, 45, 56, 67]]) if family == "t5" else INPUT.masked_fill(INPUT < 40, -100)
    with torch.no_grad():
        want = peft_model(input_ids=INPUT, attention_mask=MASK, labels=labels, task_ids=TASKS).loss
        loss = ours(INPUT, MASK, adapters="m", labels=labels, task_ids=TASKS).loss
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)


def peft_greedy(peft_model, seq2seq: bool, new: int) -> list[list[int]]:
    """Greedy decoding of PEFT's forward with the rows' task ids (see test_parity_peft.peft_greedy)."""
    batch = INPUT.shape[0]
    tokens = torch.zeros(batch, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(new):
            if seq2seq:
                start = torch.full((batch, 1), peft_model.base_model.config.decoder_start_token_id)
                dec = torch.cat([start, tokens], dim=1)
                logits = peft_model(input_ids=INPUT, attention_mask=MASK, decoder_input_ids=dec, task_ids=TASKS).logits
            else:
                ids = torch.cat([INPUT, tokens], dim=1)
                logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=TASKS).logits
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens.tolist()


@pytest.mark.parametrize("family", CAUSAL)
def test_greedy_generation_matches_greedy_decoding_of_peft_forward(family, tmp_path):
    peft_model, ours = peft_pair(family, tmp_path)
    expected = peft_greedy(peft_model, family == "t5", 8)
    ours.tokenizer.eos_token = None  # compare all tokens, as the oracle runs without an eos
    ours.base.config.eos_token_id = None
    ours.base.generation_config.eos_token_id = None
    got = generate_batch(ours, INPUT, MASK, ["m:2", "m:0"], GenerationConfig(max_new_tokens=8))
    assert [g.token_ids for g in got] == expected


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("init", ["random", "text"])
def test_our_adapter_loads_in_peft_and_back(family, init, tmp_path):
    base = tiny_base(family)
    ours = SoftPromptModel(copy.deepcopy(base), tiny_tokenizer(), name_or_path=f"tiny-{family}")
    text = {"init_text": "classify the tweet"} if init == "text" else {}
    adapter = ours.add_adapter(
        "m", method="multitask_prompt_tuning", num_virtual_tokens=N_TOKENS, num_tasks=N_TASKS, num_ranks=N_RANKS,
        init=init, seed=3, **text,
    )
    with torch.no_grad():  # trained-looking factors: tasks differ
        adapter.prefix_task_cols.mul_(25.0)
        adapter.prefix_task_rows.mul_(25.0)
    ours.save_adapter("m", tmp_path / "m")
    written = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert (written["peft_type"], written["num_tasks"], written["num_ranks"]) == (
        "MULTITASK_PROMPT_TUNING", N_TASKS, N_RANKS
    )
    assert set(load_file(tmp_path / "m" / WEIGHTS_FILE)) == {"prompt_embeddings", "prefix_task_cols", "prefix_task_rows"}
    assert not load_file(tmp_path / "m" / STATE_FILE)  # the weights file is the whole state: no second copy
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "m").eval()
    with torch.no_grad():
        got = ours(INPUT, MASK, adapters="m", task_ids=TASKS, decoder_input_ids=decoder_ids(family)).logits
    torch.testing.assert_close(got, peft_logits(peft_model, family), atol=1e-5, rtol=1e-5)
    again = SoftPromptModel(copy.deepcopy(base), tiny_tokenizer(), name_or_path=f"tiny-{family}")
    loaded = again.load_adapter(str(tmp_path / "m"), name="m")
    for name, tensor in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
