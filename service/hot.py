"""The memory tier: finished predictions, within a byte budget.

Eviction is second-chance (CLOCK): a read sets the entry's `used` flag,
one attribute write, so a GET stays a dict lookup; eviction walks from
the oldest entry, giving each used one a second round at the back.
An entry not yet written to disk (`seq` above the last committed write)
is never evicted: the disk must have it first, or it would be forgotten.
"""

from __future__ import annotations

import sys

import msgspec

# A dict slot, the Prediction struct and its float, beside the strings.
ENTRY_OVERHEAD_BYTES = 160


class Prediction(msgspec.Struct, gc=False):
    """One finished prediction. `gc=False` and few fields keep many of them small."""

    input: str
    updated_at_s: float
    result: str | None = None
    error: str | None = None
    used: bool = False  # read since the eviction clock last passed it
    seq: int = 0  # the disk write that holds it; 0: already on disk


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
        self._entries: dict[str, Prediction] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, prediction_id: str) -> bool:
        return prediction_id in self._entries

    def get(self, prediction_id: str) -> Prediction | None:
        entry = self._entries.get(prediction_id)
        if entry is not None:
            entry.used = True
        return entry

    def put(self, prediction_id: str, entry: Prediction) -> None:
        old = self._entries.pop(prediction_id, None)
        if old is not None:
            self.bytes -= entry_bytes(prediction_id, old)
        self._entries[prediction_id] = entry
        self.bytes += entry_bytes(prediction_id, entry)

    def discard(self, prediction_id: str) -> None:
        entry = self._entries.pop(prediction_id, None)
        if entry is not None:
            self.bytes -= entry_bytes(prediction_id, entry)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def evict(self, committed_seq: int, other_bytes: int = 0) -> None:
        """Drop entries until this tier and `other_bytes` fit the budget.

        Stops at the first entry the disk does not have yet: entries are
        added in write order, so the ones behind it are newer still.
        """
        entries = self._entries
        # A second chance clears `used`, so each entry goes round once at most.
        while self.bytes + other_bytes > self.max_bytes and entries:
            prediction_id = next(iter(entries))
            entry = entries[prediction_id]
            if entry.seq > committed_seq:
                return
            del entries[prediction_id]
            if entry.used:
                entry.used = False
                entries[prediction_id] = entry
            else:
                self.bytes -= entry_bytes(prediction_id, entry)
