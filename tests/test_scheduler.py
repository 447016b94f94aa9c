"""The scheduler as pure policy: no threads, no model, no clock."""

from __future__ import annotations

import pytest

from neuron_serve.artifact.graphs import GraphSet
from neuron_serve.engine.sampler import SamplingParams
from neuron_serve.engine.scheduler import QueueFullError, Scheduler
from neuron_serve.engine.sequence import Sequence
from neuron_serve.model.step import PromptChunk


def request(prompt_len: int = 3, tenant: str = "", weight: float = 1.0) -> Sequence:
    return Sequence(list(range(1, prompt_len + 1)), SamplingParams(), None, frozenset(), tenant=tenant, weight=weight)


def scheduler(
    slots: int = 2, budget: int = 0, context: tuple[int, ...] = (16, 32), max_waiting: int = 8, shortest_first=False
):
    return Scheduler(GraphSet(slots, 128, context, (64, 128), token_budget=budget), max_waiting, shortest_first)


def decoded(sched: Scheduler, seq: Sequence, token: int = 7) -> None:
    """What the engine does after a step that finished `seq`'s prompt."""
    sched.prompt_done(seq)
    seq.output_ids.append(token)


def test_waiting_requests_take_the_lowest_free_slots_in_arrival_order():
    sched = scheduler(slots=2)
    first, second, third = request(), request(), request()
    for seq in (first, second, third):
        sched.add(seq)
    plan = sched.schedule()
    assert plan.prompting == [first, second] and not plan.cancelled
    assert plan.batch.chunks == [PromptChunk(0, 0, [1, 2, 3]), PromptChunk(1, 0, [1, 2, 3])]
    assert [seq for _, _, seq in sched.waiting] == [third]
    decoded(sched, first)
    decoded(sched, second)
    sched.release(first)
    plan = sched.schedule()
    assert plan.prompting == [third] and third.slot == 0 and plan.decoding == [second]


def test_the_queue_bound_is_a_clear_error():
    sched = scheduler(max_waiting=2)
    sched.add(request())
    sched.add(request())
    with pytest.raises(QueueFullError, match=r"waiting queue is full \(2 requests\)"):
        sched.add(request())


def test_cancelled_requests_are_dropped_from_the_queue_and_free_their_slots():
    sched = scheduler(slots=2)
    gone_early, running, gone_later = request(), request(), request()
    for seq in (gone_early, running, gone_later):
        sched.add(seq)
    gone_early.cancelled.set()
    plan = sched.schedule()
    assert plan.prompting == [running, gone_later] and plan.cancelled == [gone_early]
    gone_later.cancelled.set()
    assert sched.take_cancelled() == [gone_later]
    assert sched.slots == [running, None] and sched.busy == 1 and sched.prefilling == [running]


def test_a_step_decodes_every_running_request_at_its_position():
    sched = scheduler(slots=3)
    short, long = request(prompt_len=2), request(prompt_len=5)
    for seq in (short, long):
        sched.add(seq)
    sched.schedule()
    decoded(sched, short, 11)
    decoded(sched, long, 21)
    long.output_ids.append(22)
    sched.release(short)
    batch = sched.schedule().batch
    assert (batch.decode_slots, batch.decode_tokens, batch.decode_positions) == ([1], [22], [6])
    assert not batch.chunks
    sched.release(long)
    assert not sched.has_work()


def test_a_long_prompt_is_cut_to_the_budget_and_continued_first_in_the_next_step():
    sched = scheduler(slots=4, budget=4 + 16, context=(8, 16))
    running, long, short = request(), request(prompt_len=40), request(prompt_len=5)
    sched.add(running)
    sched.schedule()
    decoded(sched, running)
    sched.add(long)
    sched.add(short)
    starts = []
    while sched.prefilling or sched.waiting:
        plan = sched.schedule()
        assert plan.decoding[0] is running, "the running stream decodes in every step"
        assert plan.batch.prompt_tokens <= 16
        assert sum(c.start > 0 for c in plan.batch.chunks) <= 1, "only one prompt continues per step"
        chunks = zip(plan.prompting, plan.batch.chunks, strict=True)
        starts.append([(seq.request_id, c.start, len(c.tokens)) for seq, c in chunks])
        for i, seq in enumerate(plan.prompting):
            if plan.finishes_prompt(i):
                decoded(sched, seq)
    long_id, short_id = long.request_id, short.request_id
    assert starts == [[(long_id, 0, 16)], [(long_id, 16, 16)], [(long_id, 32, 8), (short_id, 0, 5)]]


def test_prompts_get_the_largest_context_bucket_that_the_decodes_leave_room_for():
    sched = scheduler(slots=8, budget=24, context=(4, 8, 16, 20))
    for _ in range(6):
        sched.add(request(prompt_len=2))
    for seq in sched.schedule().prompting:
        decoded(sched, seq)
    sched.add(request(prompt_len=30))
    plan = sched.schedule()
    assert len(plan.decoding) == 6 and plan.batch.prompt_tokens == 16, "24 - 6 leaves room for 16, not 20"


def admissions(sched: Scheduler, steps: int) -> list[Sequence]:
    """The requests admitted over `steps` engine steps, each running request finishing at once."""
    order = []
    for _ in range(steps):
        plan = sched.schedule()
        order += plan.prompting
        for seq in plan.prompting:
            sched.prompt_done(seq)
            sched.release(seq)
    return order


def test_a_flooding_tenant_does_not_hold_back_another_tenants_request():
    sched = scheduler(slots=2, max_waiting=64)
    flood = [request(tenant="a") for _ in range(40)]
    for seq in flood:
        sched.add(seq)
    first = admissions(sched, 3)  # 6 of the flood run
    late = request(tenant="b")
    sched.add(late)
    # Admitted in the next step: at most one request of the flooding tenant goes before it.
    following = admissions(sched, 1)
    assert first == flood[:6] and late in following and following.index(late) <= 1


def test_admissions_follow_the_tenants_weights():
    sched = scheduler(slots=4, max_waiting=128)
    for _ in range(40):
        sched.add(request(tenant="heavy", weight=3.0))
        sched.add(request(tenant="light", weight=1.0))
    order = admissions(sched, 10)  # 40 admissions
    heavy = sum(seq.tenant == "heavy" for seq in order)
    assert len(order) == 40 and abs(heavy - 30) <= 1


def prefill_chunks(sched: Scheduler, steps: int) -> list[list[tuple[int, int, int]]]:
    """Each step's prompt chunks as (prompt length, start, tokens); a finished prompt decodes after."""
    steps_chunks = []
    for _ in range(steps):
        plan = sched.schedule()
        chunks = zip(plan.prompting, plan.batch.chunks, strict=True)
        steps_chunks.append([(len(seq.prompt_ids), c.start, len(c.tokens)) for seq, c in chunks])
        assert sum(c.start > 0 for c in plan.batch.chunks) <= 1, "only one prompt continues per step"
        for i, seq in enumerate(plan.prompting):
            if plan.finishes_prompt(i):
                decoded(sched, seq)
    return steps_chunks


def test_shortest_first_lets_a_short_prompt_go_before_a_long_one_that_arrived_first():
    arrival, shortest = scheduler(slots=4), scheduler(slots=4, shortest_first=True)  # 32 prompt tokens a step
    for sched in (arrival, shortest):
        sched.add(request(prompt_len=100))
        sched.add(request(prompt_len=10))
    assert prefill_chunks(arrival, 4) == [
        [(100, 0, 32)],
        [(100, 32, 32)],
        [(100, 64, 32)],
        [(100, 96, 4), (10, 0, 10)],
    ]
    assert prefill_chunks(shortest, 4) == [
        [(10, 0, 10), (100, 0, 22)],
        [(100, 22, 32)],
        [(100, 54, 32)],
        [(100, 86, 14)],
    ]


def test_shortest_first_moves_only_prompts_that_fit_whole_and_are_shorter_than_what_is_left():
    sched = scheduler(slots=4, shortest_first=True)
    sched.add(request(prompt_len=40))
    sched.add(request(prompt_len=33))  # never fits a step whole: waits its turn
    assert prefill_chunks(sched, 1) == [[(40, 0, 32)]]
    sched.add(request(prompt_len=10))  # longer than the 8 tokens the first prompt has left
    assert prefill_chunks(sched, 2) == [[(40, 32, 8), (33, 0, 24)], [(33, 24, 9), (10, 0, 10)]]


def test_shortest_first_passes_over_the_first_in_line_in_at_most_every_other_step():
    sched = scheduler(slots=8, budget=8 + 32, shortest_first=True)
    sched.add(request(prompt_len=100))
    for _ in range(4):
        sched.add(request(prompt_len=16))
    assert prefill_chunks(sched, 3) == [
        [(16, 0, 16), (16, 0, 16)],  # the long prompt goes without in this step ...
        [(100, 0, 32)],  # ... so it is first in the next
        [(16, 0, 16), (16, 0, 16)],
    ]
