"""Bucket sizes fitted to observed traffic, so static-shape graphs pad as little as they can.

A static-shape graph pads each request up to the smallest bucket at least its length (prompt length
for context buckets, KV length for decode buckets, decode rows for batch buckets). Given a histogram
of observed lengths and a bucket budget, `fit_buckets` chooses the bucket sizes that minimise the
padded tokens exactly, and `padding_of` evaluates any bucket set on the same histogram, so the two
can be compared (e.g. against `neuron_serve.artifact.graphs.power_of_two_buckets`).

Lengths above the largest bucket cannot be served by any bucket: they are counted in
`BucketFit.over_largest` and left out of the token sums, so the caller can warn that traffic exceeded
the largest bucket instead of having the figures silently skewed by requests that were refused.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BucketFit:
    """A bucket set and what it costs on a histogram: token sums over the served observations."""

    buckets: tuple[int, ...]  # ascending, the last is the largest
    padded_tokens: int  # sum of count * bucket(length)
    real_tokens: int  # sum of count * length
    over_largest: int  # observations longer than the largest bucket, in neither sum

    @property
    def wasted_tokens(self) -> int:
        """Padding slots: padded minus real tokens."""
        return self.padded_tokens - self.real_tokens

    @property
    def padding_ratio(self) -> float:
        """Padded over real tokens: 1.0 when nothing is padded, 2.0 when half the slots are padding."""
        return self.padded_tokens / self.real_tokens


def padding_of(histogram: Mapping[int, int], buckets: Sequence[int]) -> BucketFit:
    """What `buckets` (any order; duplicates ignored) cost on `histogram` (length -> count)."""
    sizes = tuple(sorted(set(buckets)))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"buckets must be positive sizes, got {list(buckets)!r}")
    served, over = _served(histogram, sizes[-1])
    padded = sum(count * sizes[bisect.bisect_left(sizes, length)] for length, count in served.items())
    real = sum(count * length for length, count in served.items())
    return BucketFit(sizes, padded, real, over)


def fit_buckets(histogram: Mapping[int, int], count: int, largest: int, multiple: int = 1) -> BucketFit:
    """The at most `count` buckets, the last `largest`, that pad `histogram` (length -> count) least.

    Every bucket but `largest` is a multiple of `multiple` (hardware tiles prefer them); `largest`
    need not be. The result is exact: among all such bucket sets none pads fewer tokens; of tied
    sets the one returned is unspecified.
    """
    for name, value in (("count", count), ("largest", largest), ("multiple", multiple)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    served, _ = _served(histogram, largest)
    sizes, weights = _candidates(served, largest, multiple)
    chosen = _optimal_partition(sizes, weights, count)
    return padding_of(histogram, [sizes[end - 1] for end in chosen])


def _served(histogram: Mapping[int, int], largest: int) -> tuple[dict[int, int], int]:
    """The observations at most `largest` (zero counts dropped), and how many were longer."""
    for length, count in histogram.items():
        if length < 1 or count < 0:
            raise ValueError(f"histogram needs positive lengths and non-negative counts, got {length}: {count}")
    served = {length: count for length, count in histogram.items() if count and length <= largest}
    over = sum(count for length, count in histogram.items() if length > largest)
    if not served:
        raise ValueError(f"histogram has no observation of length at most largest={largest} ({over} longer)")
    return served, over


def _candidates(served: Mapping[int, int], largest: int, multiple: int) -> tuple[list[int], list[int]]:
    """The bucket sizes an optimum can use, ascending, and how many observations each would serve alone.

    An optimal bucket can always shrink to the smallest allowed size holding its longest length, so
    the observed lengths rounded up to `multiple` (or to `largest` past it), plus `largest`, suffice.
    """
    weight: dict[int, int] = {largest: 0}
    for length, count in served.items():
        size = min(-(-length // multiple) * multiple, largest)
        weight[size] = weight.get(size, 0) + count
    sizes = sorted(weight)
    return sizes, [weight[size] for size in sizes]


def _optimal_partition(sizes: Sequence[int], weights: Sequence[int], count: int) -> list[int]:
    """The ends (1-based candidate indices) of the best min(`count`, n) buckets, the last at `sizes[-1]`.

    Using every bucket allowed is never worse: splitting a bucket's span at a lower candidate pads no
    more. best[t] is the least padded total of the observations of candidates 0..t-1 with the last
    bucket at sizes[t-1]; one more bucket extends it by best[t] = min over s < t of previous[s] +
    cost(s, t). cost(s, t) = sizes[t-1] * (weight of candidates s..t-1) is Monge (sizes ascend), so
    the minimising s does not decrease in t and divide and conquer finds each layer in O(n log n)
    rather than O(n^2): O(count * n log n) in all for n candidates.
    """
    n = len(sizes)
    prefix = [0]
    for weight in weights:
        prefix.append(prefix[-1] + weight)

    def cost(s: int, t: int) -> int:
        return sizes[t - 1] * (prefix[t] - prefix[s])

    best = [0] + [cost(0, t) for t in range(1, n + 1)]
    cuts = [[0] * (n + 1)]  # cuts[k][t]: where the last of k + 1 buckets' span starts
    for k in range(1, min(count, n)):
        layer, cut = [0] * (n + 1), [0] * (n + 1)
        # k + 1 buckets need k + 1 candidates: only t > k is reachable, from s >= k
        _fill_layer(best, cost, layer, cut, k + 1, n, k, n - 1)
        best = layer
        cuts.append(cut)
    ends, t = [], n
    for cut in reversed(cuts):
        ends.append(t)
        t = cut[t]
    return ends[::-1]


def _fill_layer(
    previous: list[int],
    cost: Callable[[int, int], int],
    layer: list[int],
    cut: list[int],
    low: int,
    high: int,
    first: int,
    last: int,
) -> None:
    """Set layer[t] and cut[t] for low <= t <= high, whose minimising s lies in first..last.

    The leftmost minimum is taken, which keeps the monotone-split argument valid under ties.
    """
    if low > high:
        return
    t = (low + high) // 2
    split = first
    layer[t] = previous[first] + cost(first, t)
    for s in range(first + 1, min(last, t - 1) + 1):
        candidate = previous[s] + cost(s, t)
        if candidate < layer[t]:
            split, layer[t] = s, candidate
    cut[t] = split
    _fill_layer(previous, cost, layer, cut, low, t - 1, first, split)
    _fill_layer(previous, cost, layer, cut, t + 1, high, split, last)
