"""Log-probabilities in OpenAI's response shapes: the legacy completions object and chat's ``content`` list.

Each token is shown as its own decoded text (special tokens included, so an end-of-sequence token reads as
e.g. ``<eos>``). A position's alternatives always include the chosen token, as vLLM does, so a client can
tell whether the chosen token was the most likely one (lm-evaluation-harness' ``is_greedy``).
"""

from __future__ import annotations

from collections.abc import Sequence

from softprompt.engine.token_logprobs import TokenLogprob
from softprompt.server.schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


class LogprobFormatter:
    """Turns `TokenLogprob` lists into response objects with one tokenizer's token texts."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text(self, ids: Sequence[int]) -> str:
        """The text of token ids (a prompt given as ids, echoed)."""
        return self.tokenizer.decode(list(ids))

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text."""
        return self.tokenizer.batch_decode([[t] for t in ids])

    def _texts(self, tokens: list[TokenLogprob]) -> dict[int, str]:
        """id -> text of every token and alternative listed (one tokenizer call for them all)."""
        ids = sorted({t.token for t in tokens} | {i for t in tokens for i, _ in t.top})
        return dict(zip(ids, self.pieces(ids)))

    @staticmethod
    def _alternatives(token: TokenLogprob, texts: dict[int, str]) -> dict[str, float]:
        top: dict[str, float] = {}
        for i, logprob in token.top + [(token.token, token.logprob)]:
            top.setdefault(texts[i], logprob)  # two ids may read the same: keep the likelier (listed first)
        return top

    def completion(
        self, prompt_text: str, prompt: tuple[Sequence[int], list[TokenLogprob]] | None, generated: list[TokenLogprob]
    ) -> CompletionLogprobs:
        """The ``logprobs`` of a completions choice. ``prompt``: the prompt's ids and the scores of its tokens
        after the first (echo), else None; ``prompt_text``: text before the first listed token (the prompt's,
        when it is not echoed), where ``text_offset`` starts counting."""
        ids: list[int] = []
        logprobs: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        texts = self._texts((prompt[1] if prompt is not None else []) + generated)
        if prompt is not None:
            prompt_ids, scores = prompt
            ids.append(prompt_ids[0])
            logprobs.append(None)
            tops.append(None)  # nothing precedes the first token to score it from
            for token in scores:
                ids.append(token.token)
                logprobs.append(token.logprob)
                tops.append(self._alternatives(token, texts))
        for token in generated:
            ids.append(token.token)
            logprobs.append(token.logprob)
            tops.append(self._alternatives(token, texts))
        tokens = self.pieces(ids)
        offsets, at = [], len(prompt_text)
        for piece in tokens:
            offsets.append(at)
            at += len(piece)
        return CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets)

    def chat(self, generated: list[TokenLogprob]) -> ChatLogprobs:
        """The ``logprobs`` of a chat choice: each generated token with its ``top_logprobs`` alternatives."""
        content = []
        texts = self._texts(generated)
        for token in generated:
            piece = texts[token.token]
            alternatives = [
                TopLogprob(token=texts[i], logprob=logprob, bytes=list(texts[i].encode())) for i, logprob in token.top
            ]
            content.append(
                ChatTokenLogprob(
                    token=piece, logprob=token.logprob, bytes=list(piece.encode()), top_logprobs=alternatives
                )
            )
        return ChatLogprobs(content=content)
