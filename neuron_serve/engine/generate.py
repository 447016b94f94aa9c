"""One prompt through the serving engine, streamed: the `neuron-serve generate` command."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from neuron_serve.backends.base import Runner
from neuron_serve.engine.engine import Engine
from neuron_serve.engine.metrics import Metrics
from neuron_serve.engine.sampler import SamplingParams
from neuron_serve.engine.sequence import Finished, Sequence

if TYPE_CHECKING:
    from neuron_serve.engine.tokenizer import TextTokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    output_tokens: int = 0
    first_token_s: float = 0.0
    total_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        decode_s = self.total_s - self.first_token_s
        return (self.output_tokens - 1) / decode_s if self.output_tokens > 1 and decode_s > 0 else 0.0


def generate(
    runner: Runner,
    tokenizer: TextTokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_ids: frozenset[int],
    stats: GenerationStats | None = None,
) -> Iterator[str]:
    """Yields text pieces as they are made, by the same engine a server replica runs."""
    stats = stats or GenerationStats()
    runner.graphs.check_prompt(prompt_ids)  # a clear ValueError for a prompt out of range
    # A registry of its own: this engine's metrics are for no one, and must not clash with a server's.
    engine = Engine(runner, Metrics("generate", CollectorRegistry()), max_waiting=1).start()
    seq = Sequence(prompt_ids, params, tokenizer, eos_ids)
    try:
        engine.submit(seq)
        while not isinstance(event := seq.events.get(), Finished):
            if event.text:
                yield event.text
        if event.error:
            raise RuntimeError(event.error)
    finally:
        seq.cancelled.set()
        engine.stop()
    stats.prompt_tokens, stats.output_tokens = len(prompt_ids), len(seq.output_ids)
    if seq.first_token_at is not None:
        stats.first_token_s = seq.first_token_at - seq.arrival
        stats.total_s = seq.last_token_at - seq.arrival
