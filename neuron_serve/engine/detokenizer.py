"""Incremental detokenization that never emits a broken UTF-8 character.

Byte-level BPE can split one character over several tokens; decoding a prefix then ends in U+FFFD.
Text is released only once it is complete, and decoding a short window (not the whole output) keeps
each step cheap; the concatenated pieces equal the full decode at the end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from neuron_serve.engine.tokenizer import TextTokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # start of the window that gives the context for the next piece
        self.read_offset = 0  # tokens up to here have been turned into released text
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Add one token; returns the newly completed text (possibly empty)."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        piece = full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self.text += piece
        return piece

    def flush(self) -> str:
        """At the end: whatever is left (a trailing incomplete character decodes as U+FFFD)."""
        rest = self._decode(self.token_ids)[len(self.text) :] if self.read_offset < len(self.token_ids) else ""
        self.text += rest
        self.read_offset = len(self.token_ids)
        return rest
