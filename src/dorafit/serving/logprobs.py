"""Log-probabilities in OpenAI's response shapes, from what the engine computed (:class:`.engine.Request`).

/v1/completions (``logprobs: k``, optionally ``echo``)::

    {"tokens": [str], "token_logprobs": [float | null], "top_logprobs": [{str: float} | null],
     "text_offset": [int]}

One entry per token: with ``echo`` the prompt's tokens first (the first has ``null``: nothing predicts it), then
the generated ones. ``text_offset[i]`` is where token i's text starts in the concatenated token texts.

/v1/chat/completions (``logprobs: true``, ``top_logprobs: k``)::

    {"content": [{"token": str, "logprob": float, "bytes": [int], "top_logprobs": [{token, logprob, bytes}]}],
     "refusal": null}

A token's text is what it adds to the text decoded so far (decoded with the few tokens before it, so that a
SentencePiece token keeps its leading space and a WordPiece continuation loses its ``##``); it may be a part of a
character for byte-level tokenizers, which ``bytes`` then shows whole.
"""

from __future__ import annotations

CONTEXT = 4  # tokens decoded before a token to find the text it adds


class TokenText:
    """The text each token adds (see the module docstring), with the special tokens' own text kept."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def piece(self, ids: list[int], i: int, token: int | None = None) -> str:
        """The text token ``token`` (default ``ids[i]``) adds after ``ids[:i]``."""
        return self._pieces(ids, i, [ids[i] if token is None else token])[0]

    def top(self, ids: list[int], i: int, alternatives: list[tuple[int, float]]) -> list[tuple[str, float]]:
        pieces = self._pieces(ids, i, [token for token, _ in alternatives])
        return [(piece, logprob) for piece, (_, logprob) in zip(pieces, alternatives)]

    def _pieces(self, ids: list[int], i: int, tokens: list[int]) -> list[str]:
        """The text each of ``tokens`` adds after ``ids[:i]`` (the context before it decoded once for all)."""
        before = ids[max(0, i - CONTEXT):i]
        head = self._decode(before)
        out = []
        for token in tokens:
            whole = self._decode(before + [token])
            out.append(whole[len(head):] if whole.startswith(head) else self._decode([token]))
        return out


def completion_logprobs(text: TokenText, ids: list[int], logprobs: list[float | None],
                        tops: list[list[tuple[int, float]] | None]) -> dict:
    """The ``logprobs`` object of a /v1/completions choice for tokens ``ids`` (prompt and/or generated)."""
    tokens, offsets, top_dicts, offset = [], [], [], 0
    for i, top in enumerate(tops):
        piece = text.piece(ids, i)
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
        top_dicts.append(None if top is None else dict(text.top(ids, i, top)))
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top_dicts, "text_offset": offsets}


def chat_logprobs(text: TokenText, prompt: list[int], ids: list[int], logprobs: list[float],
                  tops: list[list[tuple[int, float]]]) -> dict:
    """The ``logprobs`` object of a /v1/chat/completions choice for the generated tokens ``ids``."""
    whole = prompt[-CONTEXT:] + ids
    skip = len(whole) - len(ids)

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    content = []
    for j, (logprob, top) in enumerate(zip(logprobs, tops)):
        item = entry(text.piece(whole, skip + j), logprob)
        item["top_logprobs"] = [entry(t, lp) for t, lp in text.top(whole, skip + j, top)]
        content.append(item)
    return {"content": content, "refusal": None}
