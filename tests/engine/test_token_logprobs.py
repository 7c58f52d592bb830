"""`engine.token_logprobs.prompt_logprobs` (what the server's echo + logprobs returns) sums to `model.score`."""

from __future__ import annotations

import pytest

from softprompt.engine.token_logprobs import prompt_logprobs
from softprompt.errors import SoftPromptError

from serving import lively_model
from tiny import CAUSAL

CONTEXTS = ["Review: lovely soup.\nSentiment:", "Hi", "A somewhat longer review of a film, it was fine.\nSentiment:"]
LABEL = " positive"


@pytest.mark.parametrize("family", CAUSAL)
def test_prompt_logprobs_of_a_continuation_equal_model_score_in_a_mixed_batch(family):
    model = lively_model(family)
    model.add_adapter("pt", method="prompt_tuning", num_virtual_tokens=4, seed=1)
    model.add_adapter("prefix", method="prefix_tuning", num_virtual_tokens=3, seed=2)
    tok = model.tokenizer
    label = tok(LABEL, add_special_tokens=False)["input_ids"]
    adapters = ["pt", "prefix", None]
    prompts = [tok(c)["input_ids"] + label for c in CONTEXTS]
    scored = prompt_logprobs(model, prompts + [prompts[0][:1]], adapters + ["pt"], top=2)
    for context, adapter, ids, row in zip(CONTEXTS, adapters, prompts, scored):
        assert [t.token for t in row] == ids[1:] and all(len(t.top) == 2 for t in row)
        want = model.score([context], [LABEL], adapters=adapter)[0].scores[LABEL]
        assert sum(t.logprob for t in row[-len(label) :]) == pytest.approx(want, abs=1e-4)
    assert scored[-1] == []  # a one-token prompt: nothing to score


def test_encoder_decoder_models_are_refused():
    with pytest.raises(SoftPromptError, match="decoder-only"):
        prompt_logprobs(lively_model("t5"), [[5, 6]], None)
