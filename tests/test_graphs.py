"""The graph set of a recipe: its graphs, and which one runs each call with how much padding."""

from __future__ import annotations

import pytest

from neuron_serve.artifact.graphs import GraphSet, GraphUse
from neuron_serve.model.step import PromptChunk, StepBatch, StepShape

GRAPHS = GraphSet(batch_size=4, max_seq_len=128, context_buckets=(16, 32), token_buckets=(64, 128))


def test_one_graph_per_bucket_and_a_chunk_graph_only_when_a_prompt_can_outgrow_the_buckets():
    assert [s.name for s in GRAPHS.specs()] == [
        "prefill_16",
        "prefill_32",
        "prefill_chunk_32",
        "decode_64",
        "decode_128",
    ]
    whole = GraphSet(batch_size=4, max_seq_len=33, context_buckets=(16, 32), token_buckets=(33,))
    assert whole.chunk is None and "prefill_chunk_32" not in [s.name for s in whole.specs()]


def test_a_prompt_takes_the_smallest_bucket_then_chunks_of_the_largest():
    pieces = GRAPHS.prompt_pieces(list(range(1, 71)))
    assert [(p.spec.name, p.start, len(p.tokens)) for p in pieces] == [
        ("prefill_32", 0, 32),
        ("prefill_chunk_32", 32, 32),
        ("prefill_chunk_32", 64, 6),
    ]
    assert [p.use for p in pieces][-1] == GraphUse("prefill_chunk_32", 6, 32)
    assert GRAPHS.prompt_pieces([7] * 16)[0].use == GraphUse("prefill_16", 16, 16)


@pytest.mark.parametrize("length", [0, 128])
def test_a_prompt_outside_the_sequence_length_is_refused(length):
    with pytest.raises(ValueError, match="must be 1 to 127 tokens"):
        GRAPHS.prompt_pieces([1] * length)


def test_decode_runs_at_the_smallest_kv_bucket_that_holds_every_slot():
    assert GRAPHS.decode_graph([10, 63, 0, 0], active=2) == (GRAPHS.specs()[3], GraphUse("decode_64", 2, 4))
    spec, _ = GRAPHS.decode_graph([10, 64, 0, 0], active=2)
    assert spec.name == "decode_128"


def test_a_step_takes_the_smallest_bucket_of_each_dimension():
    graphs = GraphSet(8, 128, (16, 32), (64, 128), batch_buckets=(1, 2, 4, 8), token_budget=40)
    batch = StepBatch([0, 2], [5, 6], [10, 70], [PromptChunk(1, 0, [1] * 9)])
    shape, uses = graphs.step_shape(batch)
    assert shape == StepShape(decode_rows=4, prompt_tokens=16, prompts=1, kv_len=128)
    assert uses == [GraphUse("step_decode_4x128", 2, 4), GraphUse("step_prompt_16", 9, 16)]
    two_prompts = StepBatch(chunks=[PromptChunk(1, 40, [1] * 5), PromptChunk(3, 0, [2] * 3)])
    assert graphs.step_shape(two_prompts)[0] == StepShape(1, 16, 2, 64)
    decode_only = StepBatch([3], [5], [20])
    assert graphs.step_shape(decode_only) == (StepShape(4, 1, 1, 64), [GraphUse("step_decode_4x64", 1, 4)])


def test_the_step_budget_leaves_prompts_the_largest_bucket_that_fits():
    graphs = GraphSet(8, 128, (16, 32), (64, 128), token_budget=40)
    assert [graphs.prompt_budget(n) for n in (0, 8, 9, 24, 25)] == [32, 32, 16, 16, 0]
    assert GraphSet(8, 128, (16, 32), (64, 128)).token_budget == 8 + 32, "the default budget"
    assert GraphSet(8, 128, (16, 32), (64, 128)).batch_buckets == (1, 2, 4, 8)
