"""Which requests run in the next decode step. Pure bookkeeping: no torch, no tensors.

The batched runner owns a fixed number of *row slots* (each a static KV-cache slot of
`slot_len` positions, see ADR 0006) and a fixed number of *adapter slots* (GPU-resident LoRA
weights). The scheduler decides, between two decode steps:

* which waiting requests are admitted: a free row slot, enough positions for the prompt plus the
  official patch cap, and (for a LoRA request) its adapter resident or a free/evictable adapter
  slot. Requests queue instead of over-committing memory: every byte a row can use is reserved
  by its slot, so admission never OOMs;
* how large the batch is: the highest row slot in use + 1, rounded up to a batch bucket (the
  CUDA graphs are captured per bucket); rows take the lowest free slot, so the batch stays dense;
* when a row ends (its slot is freed and its adapter's reference dropped).

FIFO admission, except that a request blocked only by adapter slots (all pinned by running rows)
lets later requests pass, at most `max_skips` admissions before it blocks the queue (no starvation).
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_ATTENTION_LEN = 256  # shorter buckets save nothing measurable and cost graph captures
# Rows per GPU when --max-concurrent is not given (rows_for_memory): per-row state (the KV caches of both
# LMs, ~84 MB for VoxCPM1.5 and ~189 MB for VoxCPM2 at 5120 positions) in at most half the free memory,
# up to 128 rows (both full-size models get 128 on an 80 GB card), never under 16 (the CPU default)
AUTO_ROWS_MEMORY_SHARE = 0.5
AUTO_ROWS_CAP = 128
AUTO_ROWS_FLOOR = 16


def batch_bucket(rows: int, max_rows: int) -> int:
    """Smallest captured batch size holding `rows` rows (never above max_rows)."""
    for size in BATCH_BUCKETS:
        if size >= rows:
            return min(size, max_rows)
    return max_rows


def batch_buckets_up_to(max_rows: int) -> list[int]:
    sizes = sorted({min(size, max_rows) for size in BATCH_BUCKETS if size < max_rows} | {max_rows})
    return sizes


def rows_for_memory(free_bytes: int, bytes_per_row: int, *, share: float = AUTO_ROWS_MEMORY_SHARE,
                    cap: int = AUTO_ROWS_CAP, floor: int = AUTO_ROWS_FLOOR) -> int:
    """Batch rows for a device with `free_bytes` free once the weights are loaded: the largest batch bucket
    (a captured size, so no step runs padded rows) whose per-row state fits in `share` of it; the rest
    stays for activations, CUDA graphs and the AudioVAE's batched decodes. At least `floor`."""
    fits = int(free_bytes * share) // max(1, bytes_per_row)
    sizes = [size for size in BATCH_BUCKETS if size <= min(cap, fits)]
    return max(floor, sizes[-1] if sizes else floor)


def attention_bucket(positions: int, slot_len: int) -> int:
    """KV length the attention reads this step: a power of two >= positions (capped at slot_len)."""
    size = MIN_ATTENTION_LEN
    while size < positions:
        size *= 2
    return min(size, slot_len)


class TooLong(ValueError):
    """The prompt plus the patch cap do not fit one row slot."""


@dataclass(slots=True)
class RowRequest:
    request_id: int
    adapter_key: str | None  # None = base model
    prompt_len: int  # positions the prefill writes
    max_patches: int  # decode steps at most (the official max_len)
    steps: int  # CFM solver steps (per row)


@dataclass(slots=True)
class Admission:
    request: RowRequest
    row_slot: int
    adapter_slot: int | None  # None = base model
    load_adapter: bool  # the runner must copy the adapter's weights into adapter_slot first
    evicted_key: str | None = None  # the adapter that held adapter_slot before


@dataclass(slots=True)
class _Running:
    request: RowRequest
    row_slot: int
    adapter_slot: int | None
    position: int  # next KV position this row writes


@dataclass
class AdapterSlots:
    """GPU adapter slots: key -> slot with reference counts (running rows) and LRU eviction."""

    capacity: int
    slot_of: OrderedDict[str, int] = field(default_factory=OrderedDict)  # LRU order: first = oldest
    refs: dict[int, int] = field(default_factory=dict)
    draining: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.free: list[int] = list(range(self.capacity))

    def resident(self) -> frozenset[str]:
        return frozenset(self.slot_of)

    def can_place(self, key: str) -> bool:
        return key in self.slot_of or bool(self.free) or any(self.refs.get(s, 0) == 0 for s in self.slot_of.values())

    def acquire(self, key: str) -> tuple[int, bool, str | None]:
        """(slot, needs_load, evicted_key). Caller checked can_place()."""
        slot = self.slot_of.get(key)
        if slot is not None:
            self.slot_of.move_to_end(key)
            self.refs[slot] = self.refs.get(slot, 0) + 1
            return slot, False, None
        evicted = None
        if self.free:
            slot = self.free.pop(0)
        else:
            evicted = next(k for k, s in self.slot_of.items() if self.refs.get(s, 0) == 0)
            slot = self.slot_of.pop(evicted)
        self.slot_of[key] = slot
        self.refs[slot] = 1
        return slot, True, evicted

    def place_idle(self, key: str) -> tuple[int, str | None] | None:
        """Make `key` resident without a running row (registration); None when every slot is pinned."""
        if key in self.slot_of:
            return self.slot_of[key], None
        if not self.can_place(key):
            return None
        slot, _, evicted = self.acquire(key)
        self.refs[slot] -= 1
        return slot, evicted

    def release(self, slot: int) -> str | None:
        """Drop one reference; returns the key when a draining adapter just became unused (and left)."""
        self.refs[slot] -= 1
        if self.refs[slot] > 0:
            return None
        key = next((k for k, s in self.slot_of.items() if s == slot), None)
        if key is not None and key in self.draining:
            self.remove(key)
            return key
        return None

    def remove(self, key: str) -> None:
        slot = self.slot_of.pop(key, None)
        self.draining.discard(key)
        if slot is not None:
            self.refs.pop(slot, None)
            bisect.insort(self.free, slot)


class Scheduler:
    def __init__(self, max_rows: int, slot_len: int, adapter_slots: int, max_skips: int = 16) -> None:
        if max_rows < 1 or slot_len < 2:
            raise ValueError("max_rows must be >= 1 and slot_len >= 2")
        self.max_rows = max_rows
        self.slot_len = slot_len
        self.max_skips = max_skips
        self.adapters = AdapterSlots(max(0, adapter_slots))
        self._waiting: deque[RowRequest] = deque()
        self._skipped: dict[int, int] = {}
        self._running: dict[int, _Running] = {}
        self._free_rows: list[int] = list(range(max_rows))
        self._ids = itertools.count(1)

    # ---- queue ---------------------------------------------------------------------------------

    def new_id(self) -> int:
        return next(self._ids)

    def submit(self, request: RowRequest) -> None:
        if request.prompt_len + request.max_patches > self.slot_len:
            raise TooLong(
                f"the prompt ({request.prompt_len} positions) plus up to {request.max_patches} patches exceed "
                f"the {self.slot_len} positions of a batch row (--max-seq-len)"
            )
        if request.adapter_key is not None and self.adapters.capacity == 0:
            raise TooLong("this engine has no LoRA adapter slots (--lora-slots 0)")
        self._waiting.append(request)

    def cancel_waiting(self, request_id: int) -> bool:
        for request in self._waiting:
            if request.request_id == request_id:
                self._waiting.remove(request)
                self._skipped.pop(request_id, None)
                return True
        return False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def running_ids(self) -> list[int]:
        return list(self._running)

    def is_running(self, request_id: int) -> bool:
        return request_id in self._running

    def row_slots(self) -> dict[int, int]:
        """request id -> row slot of every running row."""
        return {rid: row.row_slot for rid, row in self._running.items()}

    # ---- admission -----------------------------------------------------------------------------

    def admit(self) -> list[Admission]:
        admitted: list[Admission] = []
        kept: deque[RowRequest] = deque()
        blocked: list[RowRequest] = []  # waiting only for an adapter slot, this round
        while self._waiting and self._free_rows:
            request = self._waiting.popleft()
            key = request.adapter_key
            if key is not None and not self.adapters.can_place(key):
                kept.append(request)
                blocked.append(request)
                continue
            if any(self._skipped.get(b.request_id, 0) >= self.max_skips for b in blocked):
                kept.append(request)
                break  # a blocked request has been passed often enough: nobody passes it any more
            for b in blocked:  # each admission that overtakes a blocked request counts as one pass
                self._skipped[b.request_id] = self._skipped.get(b.request_id, 0) + 1
            row_slot = self._free_rows.pop(0)
            adapter_slot, load, evicted = (None, False, None)
            if key is not None:
                adapter_slot, load, evicted = self.adapters.acquire(key)
            self._skipped.pop(request.request_id, None)
            self._running[request.request_id] = _Running(request, row_slot, adapter_slot, request.prompt_len)
            admitted.append(Admission(request, row_slot, adapter_slot, load, evicted))
        kept.extend(self._waiting)
        self._waiting = kept
        return admitted

    def finish(self, request_id: int) -> str | None:
        """Free the row's slots; returns an adapter key that finished draining, if any."""
        row = self._running.pop(request_id)
        bisect.insort(self._free_rows, row.row_slot)
        if row.adapter_slot is not None:
            return self.adapters.release(row.adapter_slot)
        return None

    def advance(self, request_ids: Iterable[int]) -> None:
        """One decode step happened for these rows (each wrote one KV position)."""
        for request_id in request_ids:
            self._running[request_id].position += 1

    # ---- shape of the next step ----------------------------------------------------------------

    def batch_rows(self) -> int:
        """Rows the step must cover: highest row slot in use + 1 (0 when idle)."""
        return max((r.row_slot for r in self._running.values()), default=-1) + 1

    def attention_len(self) -> int:
        """KV positions the step must read: the furthest row's position + 1."""
        return max((r.position for r in self._running.values()), default=0) + 1

    def solver_steps(self) -> int:
        return max((r.request.steps for r in self._running.values()), default=1)

    def uses_adapters(self) -> bool:
        return any(r.adapter_slot is not None for r in self._running.values())

    # ---- adapters ------------------------------------------------------------------------------

    def drain_adapter(self, key: str) -> bool:
        """Unregister: running rows keep it, new requests are refused; True when already gone."""
        if key not in self.adapters.slot_of:
            return True
        slot = self.adapters.slot_of[key]
        if self.adapters.refs.get(slot, 0) == 0:
            self.adapters.remove(key)
            return True
        self.adapters.draining.add(key)
        return False

    def waiting_ids(self, adapter_key: str) -> list[int]:
        return [r.request_id for r in self._waiting if r.adapter_key == adapter_key]

    def is_draining(self, key: str | None) -> bool:
        return key is not None and key in self.adapters.draining
