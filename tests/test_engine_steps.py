"""The engine's token-budget steps on the tiny model: what they run (their records) and what comes out."""

from __future__ import annotations

import time

import pytest
from conftest import eager_runner, wait_finished
from prometheus_client import CollectorRegistry

from neuron_serve.engine.engine import Engine
from neuron_serve.engine.metrics import Metrics
from neuron_serve.engine.sampler import SamplingParams
from neuron_serve.engine.sequence import Sequence
from neuron_serve.weights.loader import build_model

PROMPT_LENGTHS = (5, 37, 2, 23, 9, 14)


@pytest.fixture(scope="module")
def model(tiny_loaded):
    return build_model(tiny_loaded, 128)


def prompts() -> list[list[int]]:
    return [[(i * 13 + n) % 300 + 3 for i in range(n)] for n in PROMPT_LENGTHS]


def serve(model, tokenizer, prompts, max_tokens=10, submit_after=None, **graph_set):
    """Run the prompts through an engine; returns (the requests, the engine's step records).
    `submit_after[i]`: submit prompt i only once the engine has run that many steps."""
    runner = eager_runner(model, 4, context_buckets=[8, 16], token_buckets=[64, 128], **graph_set)
    engine = Engine(runner, Metrics("test", CollectorRegistry()), max_waiting=16).start()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    requests = [Sequence(p, params, tokenizer, frozenset()) for p in prompts]
    try:
        for i, seq in enumerate(requests):
            deadline = time.monotonic() + 60
            while submit_after and len(engine.steps) < submit_after[i] and time.monotonic() < deadline:
                time.sleep(0.001)
            engine.submit(seq)
        wait_finished(requests)
    finally:
        engine.stop()
    return requests, list(engine.steps)


def test_greedy_output_is_the_same_however_prompts_are_chunked_and_batched(model, tiny_loaded):
    tokenizer = tiny_loaded.tokenizer
    alone = [serve(model, tokenizer, [p], token_budget=4 + 16)[0][0].output_ids for p in prompts()]
    for budget in (4 + 8, 4 + 16):  # the smallest budget cuts every prompt but two; the largest packs them
        requests, steps = serve(model, tokenizer, prompts(), token_budget=budget)
        assert [r.output_ids for r in requests] == alone, f"token budget {budget}"
        assert any(len(s.chunks) > 1 for s in steps), "several prompts shared a step"
        assert any(s.decoded and s.chunks for s in steps), "prompts shared steps with decodes"
        assert any(start > 0 for s in steps for _, start, _ in s.chunks), "a prompt was cut"
    staggered, _ = serve(model, tokenizer, prompts(), submit_after=[0, 1, 3, 6, 10, 15], token_budget=4 + 8)
    assert [r.output_ids for r in staggered] == alone


def test_running_streams_get_a_token_every_step_while_a_long_prompt_goes_in(model, tiny_loaded):
    """Two streams are decoding when a 100-token prompt arrives; with 16 tokens a step, two of them
    the streams' decode tokens, prompts get the largest context bucket in the other 14 (8): it takes
    13 steps to go in, and each of them decodes both streams."""
    long_prompt = [(i * 7) % 300 + 3 for i in range(100)]
    requests, steps = serve(
        model,
        tiny_loaded.tokenizer,
        [prompts()[0], prompts()[2], long_prompt],
        max_tokens=30,
        submit_after=[0, 0, 2],
        token_budget=4 + 12,
    )
    first, second, long = (r.request_id for r in requests)
    long_steps = [s for s in steps if any(rid == long for rid, _, _ in s.chunks)]
    assert [sum(n for rid, _, n in s.chunks if rid == long) for s in long_steps] == [8] * 12 + [4]
    for s in long_steps:
        assert first in s.decoded and second in s.decoded, s


def test_under_a_flood_another_tenants_request_is_admitted_next(model, tiny_loaded):
    """From the engine's step records: 12 requests of one tenant are queued, then one of another
    tenant behind them; before the engine starts, so that no step races the arrivals. It is admitted
    with at most one of the flood before it (first come, first served would make it the 13th)."""
    runner = eager_runner(model, 4, context_buckets=[8, 16], token_buckets=[64, 128])
    engine = Engine(runner, Metrics("test", CollectorRegistry()), max_waiting=16)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    flood = [Sequence(p, params, tiny_loaded.tokenizer, frozenset(), tenant="flood") for p in prompts() * 2]
    other = Sequence(prompts()[0], params, tiny_loaded.tokenizer, frozenset(), tenant="other")
    for seq in [*flood, other]:
        engine.submit(seq)
    engine.start()
    try:
        wait_finished([*flood, other])
    finally:
        engine.stop()
    admitted = [rid for step in engine.steps for rid, start, _ in step.chunks if start == 0]
    assert len(admitted) == 13 and other.request_id in admitted[:2], admitted
