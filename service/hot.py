"""The memory tier: finished predictions, within a byte budget.

Eviction is second-chance (CLOCK): a read sets the entry's `used` flag,
one attribute write, so a GET stays a dict lookup; eviction walks from
the oldest entry, giving each used one a second round at the back.
An entry not yet written to disk (`seq` above the last committed write)
is never evicted: the disk must have it first, or it would be forgotten.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import msgspec

# Beside its strings: the Prediction struct, its floats and ints, an
# OrderedDict slot (219 B measured with tracemalloc; 195 B with the
# lifecycle's times and attempts, measured the same way).
ENTRY_OVERHEAD_BYTES = 220


class Prediction(msgspec.Struct, gc=False):
    """One finished prediction. `gc=False` and few fields keep many of them small.

    Finished means an outcome: a result, an error, or `canceled`.
    """

    input: str
    updated_at_s: float
    result: str | None = None
    error: str | None = None
    used: bool = False  # read since the eviction clock last passed it
    seq: int = 0  # the disk write that holds it; 0: already on disk
    cost: int = 0  # its bytes in the budget, set when it enters the tier
    created_at_s: float = 0.0
    started_at_s: float = 0.0  # 0: no run began
    attempts: int = 0
    canceled: bool = False


def entry_bytes(prediction_id: str, entry: Prediction) -> int:
    """What one entry costs the budget: its strings as Python holds them, plus overhead."""
    answer = entry.result if entry.result is not None else entry.error
    return (
        sys.getsizeof(prediction_id)
        + sys.getsizeof(entry.input)
        + sys.getsizeof(answer)
        + ENTRY_OVERHEAD_BYTES
    )


class HotCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        # Not a dict: popping a dict's oldest entry over and over leaves
        # holes that every later look at its head walks past (quadratic
        # over a replay); an OrderedDict's head is a linked list.
        # Read-only outside this class: `prediction_id in cache.entries`
        # skips a method call on paths taken per event.
        self.entries: OrderedDict[str, Prediction] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, prediction_id: str) -> Prediction | None:
        entry = self.entries.get(prediction_id)
        if entry is not None:
            entry.used = True
        return entry

    def put(self, prediction_id: str, entry: Prediction) -> None:
        old = self.entries.pop(prediction_id, None)
        if old is not None:
            self.bytes -= old.cost
        entry.cost = entry_bytes(prediction_id, entry)
        self.entries[prediction_id] = entry
        self.bytes += entry.cost

    def discard(self, prediction_id: str) -> None:
        entry = self.entries.pop(prediction_id, None)
        if entry is not None:
            self.bytes -= entry.cost

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def evict(self, committed_seq: int, other_bytes: int = 0) -> None:
        """Drop entries until this tier and `other_bytes` fit the budget.

        Stops at the first entry the disk does not have yet: entries are
        added in write order, so the ones behind it are newer still.
        """
        entries = self.entries
        # A second chance clears `used`, so each entry goes round once at most.
        while self.bytes + other_bytes > self.max_bytes and entries:
            prediction_id, entry = next(iter(entries.items()))
            if entry.seq > committed_seq:
                return
            if entry.used:
                entry.used = False
                entries.move_to_end(prediction_id)
            else:
                del entries[prediction_id]
                self.bytes -= entry.cost
