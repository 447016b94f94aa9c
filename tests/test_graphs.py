"""The graph set of a recipe: its graphs, and which one runs each call with how much padding."""

from __future__ import annotations

import pytest

from neuron_serve.artifact.graphs import GraphSet, GraphUse
from neuron_serve.model.step import PromptChunk, StepBatch, StepShape

GRAPHS = GraphSet(batch_size=4, max_seq_len=128, context_buckets=(16, 32), token_buckets=(64, 128))


def test_a_static_set_compiles_decode_steps_per_batch_bucket_and_prompt_steps_at_the_full_batch():
    static = GraphSet(4, 128, (16, 32), (64, 128), static=True)
    assert static.compiled_shapes() == [
        StepShape(1, 1, 1, 64),
        StepShape(2, 1, 1, 64),
        StepShape(4, 1, 1, 64),
        StepShape(1, 1, 1, 128),
        StepShape(2, 1, 1, 128),
        StepShape(4, 1, 1, 128),
        StepShape(4, 16, 4, 64),
        StepShape(4, 32, 4, 64),
        StepShape(4, 16, 4, 128),
        StepShape(4, 32, 4, 128),
    ]
    batch = StepBatch([0], [5], [70], [PromptChunk(1, 0, [1] * 9)])
    shape, uses = static.step_shape(batch)
    assert shape == StepShape(4, 16, 4, 128) and shape in static.compiled_shapes()
    assert uses == [GraphUse("step_decode_4x128", 1, 4), GraphUse("step_prompt_16", 9, 16)]
    assert static.step_shape(StepBatch([1], [5], [3]))[0] == StepShape(2, 1, 1, 64)


@pytest.mark.parametrize("every_graph", [True, False])
def test_warm_up_runs_each_compiled_shape_once_or_one_prompt_and_one_decode(every_graph):
    graphs = GraphSet(4, 128, (16, 32), (64, 128), static=every_graph)
    shapes = [graphs.step_shape(batch)[0] for batch in graphs.warm_up_batches(every_graph)]
    if every_graph:
        assert shapes == graphs.compiled_shapes()
    else:
        assert shapes == [StepShape(1, 16, 1, 64), StepShape(1, 1, 1, 64)]


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
