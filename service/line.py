"""The queued predictions of a replica, in line: a place in it in O(log n).

A status request reports `queued_ahead`, how many predictions still
queued were accepted before this one. Counting them by a scan costs the
length of the queue on every request, 100,000 at a busy time; here it
is a Fenwick (binary indexed) tree's prefix sum: O(log n).

Joins are always at the end (the order "accepted" events are read from
the log); leaves are anywhere (a prediction starts, ends or is
canceled). Each member holds a slot, a number that only grows, in a
window of `capacity` slots; the tree counts the members at each slot,
so those ahead of one are the sum over the slots below its own. A slot
left behind is never reused: when the window is full, the members are
renumbered from 0 and the window rebuilt at twice their number, so
memory follows the members in line, not every prediction ever queued.
"""

from __future__ import annotations

# The smallest window: below it, rebuilding costs more than it saves.
MIN_CAPACITY = 1024
# A window more than this many times larger than the line is shrunk, so
# a line that drained from 100,000 to 10 does not keep 200,000 slots.
SHRINK_FACTOR = 8


class Line:
    """Queued predictions in the order they joined; a place in line in O(log n).

    `capacity` is the number of slots in the window: memory is O(capacity),
    and capacity stays within max(SHRINK_FACTOR * len(line), MIN_CAPACITY).
    Every operation is O(log n), amortized over the window's rebuilds.
    """

    def __init__(self) -> None:
        self.clear()

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, prediction_id: object) -> bool:
        return prediction_id in self._slots

    def clear(self) -> None:
        # A dict keeps insertion order, so its keys are the line in order.
        self._slots: dict[str, int] = {}
        self._next_slot = 0  # where the next to join goes
        self.capacity = MIN_CAPACITY
        self._tree = _counts_tree(0, MIN_CAPACITY)

    def join(self, prediction_id: str) -> None:
        """Put it at the end of the line; no-op if already in line."""
        if prediction_id in self._slots:
            return
        if self._next_slot == self.capacity:
            self._rebuild()
        slot = self._next_slot
        self._next_slot += 1
        self._slots[prediction_id] = slot
        self._add(slot, 1)

    def leave(self, prediction_id: str) -> None:
        """Take it out of the line, wherever it is; no-op if not in line."""
        slot = self._slots.pop(prediction_id, None)
        if slot is None:
            return
        self._add(slot, -1)
        if self.capacity > MIN_CAPACITY and len(self._slots) * SHRINK_FACTOR < self.capacity:
            self._rebuild()

    def ahead(self, prediction_id: str) -> int | None:
        """How many in line joined before it; None if it is not in line."""
        slot = self._slots.get(prediction_id)
        return None if slot is None else self._count_below(slot)

    # The tree: node i (from 1) counts the members at slots [i - lowbit(i), i),
    # where lowbit(i) = i & -i, the lowest set bit of i.

    def _add(self, slot: int, delta: int) -> None:
        tree, capacity = self._tree, self.capacity
        node = slot + 1
        while node <= capacity:  # every node whose range holds the slot
            tree[node] += delta
            node += node & -node

    def _count_below(self, slot: int) -> int:
        tree, count = self._tree, 0
        node = slot
        while node:  # ranges that tile [0, slot), from the right
            count += tree[node]
            node &= node - 1
        return count

    def _rebuild(self) -> None:
        """Renumber the members from 0, in order, into a window twice their number.

        O(len + capacity); the window then takes len more joins, or loses
        most of its members, before the next, so that is amortized.
        """
        members = len(self._slots)
        self._slots = {prediction_id: slot for slot, prediction_id in enumerate(self._slots)}
        self._next_slot = members
        self.capacity = max(2 * members, MIN_CAPACITY)
        self._tree = _counts_tree(members, self.capacity)


def _counts_tree(members: int, capacity: int) -> list[int]:
    """The tree of a window whose first `members` slots are taken, in O(capacity).

    The linear-time build: each node starts as its own slot's count and
    passes its total to its parent, the next node whose range holds its own.
    """
    tree = [0] + [1] * members + [0] * (capacity - members)
    for node in range(1, capacity + 1):
        parent = node + (node & -node)
        if parent <= capacity:
            tree[parent] += tree[node]
    return tree
