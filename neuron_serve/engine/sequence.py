"""One request's life in the engine: its prompt, sampling state, output stream and stop handling."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from neuron_serve.engine.detokenizer import IncrementalDetokenizer
from neuron_serve.engine.sampler import SamplingParams, new_generator
from neuron_serve.engine.stop_strings import StopStringFilter

if TYPE_CHECKING:
    from neuron_serve.engine.tokenizer import TextTokenizer

_ids = itertools.count()


@dataclass
class Delta:
    """New text for the client (possibly empty when only a token was made)."""

    text: str
    token_ids: list[int]


@dataclass
class Finished:
    reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    tokenizer: TextTokenizer
    eos_ids: frozenset[int]
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    prompt_computed: int = 0  # prompt tokens in the KV cache or in the step being run
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: str | None = None
    tenant: str = ""  # who sent it (the tenants file's name; "" without one)
    weight: float = 1.0  # the tenant's share of admissions, against the other tenants waiting

    def __post_init__(self):
        self.generator: torch.Generator = new_generator(self.params.seed)
        self.detokenizer = IncrementalDetokenizer(self.tokenizer)
        self.stop_filter = StopStringFilter(self.params.stop)

    @property
    def position(self) -> int:
        """Where the next token goes in the KV cache: the last sampled token is not stored yet."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    def append(self, token: int, max_seq_len: int) -> str | None:
        """Record a sampled token and send its text; returns the finish reason once finished."""
        params = self.params
        if token in self.eos_ids and not params.ignore_eos or token in params.stop_token_ids:
            return self.finish("stop")
        self.output_ids.append(token)
        text, hit_stop = self.stop_filter.push(self.detokenizer.add(token))
        if text or not hit_stop:
            self.events.put(Delta(text, [token]))
        if hit_stop:
            return self.finish("stop", flush=False)
        out_of_room = len(self.prompt_ids) + len(self.output_ids) >= max_seq_len
        if len(self.output_ids) >= params.max_tokens or out_of_room:
            return self.finish("length")
        return None

    def finish(self, reason: str, flush: bool = True, error: str | None = None) -> str:
        if flush and reason in ("stop", "length"):
            rest, hit_stop = self.stop_filter.push(self.detokenizer.flush())
            rest += "" if hit_stop else self.stop_filter.flush()
            if rest:
                self.events.put(Delta(rest, []))
        self.finish_reason = reason
        self.events.put(Finished(reason, len(self.prompt_ids), len(self.output_ids), error))
        return reason
