"""The scheduler as pure policy: no threads, no model, no clock."""

from __future__ import annotations

import pytest

from neuron_serve.engine.sampler import SamplingParams
from neuron_serve.engine.scheduler import QueueFullError, Scheduler
from neuron_serve.engine.sequence import Sequence


def request(prompt_len: int = 3) -> Sequence:
    return Sequence(list(range(1, prompt_len + 1)), SamplingParams(), None, frozenset())


def test_waiting_requests_take_free_slots_in_arrival_order():
    scheduler = Scheduler(slots=2, max_waiting=8)
    first, second, third = request(), request(), request()
    for seq in (first, second, third):
        scheduler.add(seq)
    admitted, cancelled = scheduler.admit()
    assert admitted == [first, second] and not cancelled
    assert [first.slot, second.slot] == [0, 1] and list(scheduler.waiting) == [third]
    assert scheduler.admit() == ([], []), "no slot is free"
    scheduler.release(first)
    assert scheduler.admit() == ([third], []) and third.slot == 0


def test_the_queue_bound_is_a_clear_error():
    scheduler = Scheduler(slots=1, max_waiting=2)
    scheduler.add(request())
    scheduler.add(request())
    with pytest.raises(QueueFullError, match=r"waiting queue is full \(2 requests\)"):
        scheduler.add(request())


def test_cancelled_requests_are_dropped_from_the_queue_and_free_their_slots():
    scheduler = Scheduler(slots=2, max_waiting=8)
    gone_early, running, gone_later = request(), request(), request()
    for seq in (gone_early, running, gone_later):
        scheduler.add(seq)
    gone_early.cancelled.set()
    admitted, cancelled = scheduler.admit()
    assert admitted == [running, gone_later] and cancelled == [gone_early]
    gone_later.cancelled.set()
    assert scheduler.take_cancelled() == [gone_later]
    assert scheduler.slots == [running, None] and scheduler.busy == 1


def test_a_decode_batch_carries_each_busy_slot_at_its_position():
    scheduler = Scheduler(slots=3, max_waiting=8)
    short, long = request(prompt_len=2), request(prompt_len=5)
    for seq in (short, long):
        scheduler.add(seq)
    scheduler.admit()
    short.output_ids, long.output_ids = [11], [21, 22]
    scheduler.release(short)
    batch = scheduler.decode_batch()
    assert batch.sequences == [long]
    assert batch.tokens == [0, 22, 0] and batch.positions == [0, 6, 0]
    scheduler.release(long)
    assert scheduler.decode_batch() is None and not scheduler.has_work()
