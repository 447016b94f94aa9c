"""Stop strings found in a stream of text, in time linear in the text and the stop strings.

The filter runs on the engine thread, once per generated token, for every running stream: a naive
search of each pending suffix against each stop string prefix is quadratic in the stop string's
length, and a request with 16 stop strings of 250,000 characters would stall every other stream of
the replica for minutes. So each stop string is matched by a Knuth-Morris-Pratt automaton, whose
table the request's own thread builds when the request arrives: afterwards each new character costs
amortised O(1) per stop string, and the automaton's state is also the length of the text to hold
back (the longest stop string prefix the text ends with).
"""

from __future__ import annotations


class _StopMatcher:
    """One stop string's automaton: `state` is the length of the longest prefix of the stop string
    that the text seen so far ends with."""

    def __init__(self, stop: str):
        self.stop = stop
        self.fallback = [0] * len(stop)  # the KMP prefix function of `stop`
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fallback[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fallback[i] = k
        self.state = 0

    def feed(self, char: str) -> bool:
        """Advance by one character; True when the text now ends with the whole stop string."""
        while self.state and self.stop[self.state] != char:
            self.state = self.fallback[self.state - 1]
        if self.stop[self.state] == char:
            self.state += 1
        if self.state == len(self.stop):
            self.state = self.fallback[-1]
            return True
        return False


class StopStringFilter:
    """Holds back text that could be the start of a stop string, so that a stop string is never
    sent, not even in part; the first stop string to end in the text ends it."""

    def __init__(self, stops: tuple[str, ...]):
        self.matchers = [_StopMatcher(stop) for stop in stops if stop]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to send now, whether a stop string was hit)."""
        start = len(self.pending)
        self.pending += text
        if not self.matchers:
            out, self.pending = self.pending, ""
            return out, False
        for offset, char in enumerate(text):
            hits = [m.stop for m in self.matchers if m.feed(char)]
            if hits:
                end = start + offset + 1
                out, self.pending = self.pending[: end - max(map(len, hits))], ""
                return out, True
        keep = max(m.state for m in self.matchers)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
