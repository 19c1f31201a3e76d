"""Incremental detokenization and stop-string handling."""

from __future__ import annotations

from tokenizers import Tokenizer

from expertmesh.engine.sequence import Sequence

# The first output token is decoded after the prompt's last few tokens, as vLLM's incremental
# detokenizer starts: a SentencePiece decoder drops the leading space of a text (its dummy
# prefix), but the "▁" of a continuation's first word is a real space after the prompt.
PROMPT_CONTEXT_TOKENS = 5


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """With `add_special_tokens`, what the tokenizer adds to a text of its own (BOS where its
        config asks, as Pangu's and Llama's do; nothing for the ChatML families)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def append_token(self, seq: Sequence) -> str:
        """Extend `seq.text` with the newest token; returns the new characters.

        Decodes only a short window (vLLM's prefix/read offsets) and holds back a
        token that ends inside a multi-byte character until it completes.
        """
        ids, skip = seq.output_token_ids, seq.params.skip_special_tokens
        context = seq.prompt_token_ids[-PROMPT_CONTEXT_TOKENS:] if seq.read_offset == 0 else []
        before = self.decode(context + ids[seq.prefix_offset : seq.read_offset], skip)
        after = self.decode(context + ids[seq.prefix_offset :], skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            new = after[len(before) :]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            seq.text += new
            return new
        return ""


def find_stop(text: str, new_chars: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the last `new_chars` characters: (index, stop)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        i = text.find(stop, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    return best


def stop_holdback(stops: list[str]) -> int:
    """Characters to withhold from a stream: they may be the start of a stop string."""
    return max((len(s) for s in stops), default=1) - 1
