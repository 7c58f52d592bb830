"""Grammar-constrained decoding in the engine: a row's constraint masks only that row inside `next_tokens`,
greedy and sampled; rows without one pick exactly what they picked before; llguidance's JSON grammars force
valid JSON even from random logits; a schema it cannot compile, or a missing library, is one clear line."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from softprompt.engine.constraints import INSTALL, GrammarError, GrammarUnavailable, JsonGrammars
from softprompt.engine.decode import make_sampler, next_tokens

from tiny import VOCAB, tiny_tokenizer

EOS = 1
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["ok", "color", "n"],
    "additionalProperties": False,
}


class Only:
    """A constraint that allows one token."""

    def __init__(self, token: int):
        self.token = token

    def mask(self, logits: torch.Tensor) -> None:
        keep = logits[self.token].clone()
        logits.fill_(float("-inf"))
        logits[self.token] = keep


def test_a_constraint_masks_its_own_row_only_greedy_and_sampled():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    free = next_tokens(logits, None)
    assert torch.equal(next_tokens(logits, None, [None] * 4), free)
    picked = next_tokens(logits, None, [None, Only(7), None, None])
    assert picked[1] == 7 and torch.equal(picked[[0, 2, 3]], free[[0, 2, 3]])
    assert torch.equal(logits, before)  # the caller's logits (log-probabilities come from them) are untouched
    for row in range(4):  # a sampled row draws alone with its own generator, as the batcher does
        alone = next_tokens(logits[row : row + 1], make_sampler(1.0, seed=5))
        assert torch.equal(next_tokens(logits[row : row + 1], make_sampler(1.0, seed=5), [None]), alone)
        assert next_tokens(logits[row : row + 1], make_sampler(1.0, seed=5), [Only(9)])[0] == 9


def decode_randomly(grammars: JsonGrammars, schema, seed: int, sample: bool, limit: int = 400) -> str:
    """Drive a matcher with random logits until it emits end of sequence; the text it produced."""
    matcher, tokens = grammars.compile(schema).matcher(), []
    generator = torch.Generator().manual_seed(seed)
    sampler = make_sampler(1.0, seed=seed) if sample else None
    for _ in range(limit):
        logits = torch.randn(1, VOCAB, generator=generator) * 3
        token = int(next_tokens(logits, sampler, [matcher])[0])
        matcher.advance(token)
        if token == EOS:
            assert matcher.accepting
            return tiny_tokenizer().decode(tokens)
        tokens.append(token)
    raise AssertionError(f"no end of sequence in {limit} tokens: {tiny_tokenizer().decode(tokens)!r}")


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_json_grammars_force_valid_json_from_random_logits(sample):
    pytest.importorskip("llguidance")
    grammars = JsonGrammars(tiny_tokenizer(), VOCAB, [EOS])
    for seed in range(5):
        value = json.loads(decode_randomly(grammars, SCHEMA, seed, sample))
        assert set(value) == {"ok", "color", "n"} and isinstance(value["ok"], bool)
        assert value["color"] in ("red", "green", "blue") and isinstance(value["n"], int) and 0 <= value["n"] <= 9
        assert isinstance(json.loads(decode_randomly(grammars, None, seed, sample, limit=2000)), dict)


@pytest.mark.parametrize(
    "schema, reason",
    [
        ({"type": "foo"}, "Invalid type: foo"),
        ({"not": {"type": "string"}}, "Unimplemented keys"),
        ({"$ref": "#/nope"}, "does not exist"),
        ({"type": "string", "pattern": "(("}, "regex parse error"),
    ],
)
def test_a_schema_llguidance_cannot_compile_says_why(schema, reason):
    pytest.importorskip("llguidance")
    with pytest.raises(GrammarError, match=reason.replace("$", r"\$")):
        JsonGrammars(tiny_tokenizer(), VOCAB, [EOS]).compile(schema)


def test_without_llguidance_the_error_is_one_line_with_the_install_command(monkeypatch):
    for name in ("llguidance", "llguidance.hf", "llguidance.torch"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if it were not installed
    with pytest.raises(GrammarUnavailable) as info:
        JsonGrammars(tiny_tokenizer(), VOCAB, [EOS]).compile(SCHEMA)
    assert INSTALL in str(info.value) and "\n" not in str(info.value)
