"""The batched engine's scheduler (engine/batched/scheduler.py): pure bookkeeping, no torch.

Row slots (lowest free first, dense batches), FIFO admission with bounded skipping for requests
blocked by pinned adapter slots, adapter slots with reference counts / LRU eviction / draining,
and the bucket helpers that pick the captured step shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voxcpm_api.engine.batched.scheduler import (
    BATCH_BUCKETS,
    MIN_ATTENTION_LEN,
    AdapterSlots,
    RowRequest,
    Scheduler,
    TooLong,
    attention_bucket,
    batch_bucket,
    batch_buckets_up_to,
)

SLOT_LEN = 1000
SRC = Path(__file__).resolve().parents[2] / "src"


def make(sched: Scheduler, adapter: str | None = None, *, prompt: int = 10, patches: int = 20,
         steps: int = 10) -> RowRequest:
    return RowRequest(sched.new_id(), adapter, prompt, patches, steps)


def submit(sched: Scheduler, adapter: str | None = None, **kwargs: int) -> RowRequest:
    request = make(sched, adapter, **kwargs)
    sched.submit(request)
    return request


def admitted_ids(admissions) -> list[int]:
    return [a.request.request_id for a in admissions]


# ------------------------------------------------------------------------------------------ torch-free


def test_importing_the_scheduler_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import voxcpm_api.engine.batched.scheduler\n"
        "print('torch' in sys.modules, [m for m in sys.modules if m.startswith('torch')][:3])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False []", out.stdout


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        Scheduler(max_rows=0, slot_len=100, adapter_slots=1)
    with pytest.raises(ValueError):
        Scheduler(max_rows=1, slot_len=1, adapter_slots=1)
    assert Scheduler(max_rows=1, slot_len=2, adapter_slots=-3).adapters.capacity == 0


# ------------------------------------------------------------------------------------------ row slots


def test_rows_take_the_lowest_free_slot_and_batch_rows_stays_dense() -> None:
    sched = Scheduler(max_rows=4, slot_len=SLOT_LEN, adapter_slots=2)
    assert sched.batch_rows() == 0 and sched.running == 0
    reqs = [submit(sched) for _ in range(4)]
    admissions = sched.admit()
    assert [a.row_slot for a in admissions] == [0, 1, 2, 3]
    assert sched.row_slots() == {r.request_id: i for i, r in enumerate(reqs)}
    assert sched.batch_rows() == 4

    sched.finish(reqs[1].request_id)
    sched.finish(reqs[3].request_id)
    assert sched.batch_rows() == 3  # slot 2 is still in use
    late = submit(sched)
    (admission,) = sched.admit()
    assert admission.request is late and admission.row_slot == 1  # the lowest free slot, not 3
    assert sched.batch_rows() == 3

    sched.finish(reqs[2].request_id)
    assert sched.batch_rows() == 2
    again = submit(sched)
    assert sched.admit()[0].row_slot == 2
    sched.finish(reqs[0].request_id)
    sched.finish(late.request_id)
    sched.finish(again.request_id)
    assert sched.batch_rows() == 0 and sched.running == 0


def test_admission_is_fifo_and_bounded_by_max_rows() -> None:
    sched = Scheduler(max_rows=2, slot_len=SLOT_LEN, adapter_slots=2)
    reqs = [submit(sched) for _ in range(5)]
    assert sched.waiting == 5
    assert admitted_ids(sched.admit()) == [reqs[0].request_id, reqs[1].request_id]
    assert sched.running == 2 and sched.waiting == 3
    assert sched.admit() == []  # no free row: the rest queue
    sched.finish(reqs[1].request_id)
    assert admitted_ids(sched.admit()) == [reqs[2].request_id]
    sched.finish(reqs[0].request_id)
    sched.finish(reqs[2].request_id)
    assert admitted_ids(sched.admit()) == [reqs[3].request_id, reqs[4].request_id]
    assert sched.waiting == 0 and sched.running == 2
    assert sorted(sched.running_ids()) == [reqs[3].request_id, reqs[4].request_id]
    assert sched.is_running(reqs[3].request_id) and not sched.is_running(reqs[0].request_id)


def test_too_long_requests_are_refused_at_submit() -> None:
    sched = Scheduler(max_rows=2, slot_len=100, adapter_slots=1)
    sched.submit(make(sched, prompt=40, patches=60))  # exactly fits
    with pytest.raises(TooLong, match="100 positions"):
        sched.submit(make(sched, prompt=40, patches=61))
    assert sched.waiting == 1
    no_lora = Scheduler(max_rows=2, slot_len=100, adapter_slots=0)
    with pytest.raises(TooLong, match="no LoRA adapter slots"):
        no_lora.submit(make(no_lora, "a"))
    no_lora.submit(make(no_lora))  # the base model still works
    assert issubclass(TooLong, ValueError)


def test_cancel_waiting() -> None:
    sched = Scheduler(max_rows=1, slot_len=SLOT_LEN, adapter_slots=1)
    first, second, third = submit(sched), submit(sched), submit(sched)
    sched.admit()
    assert sched.cancel_waiting(second.request_id)
    assert not sched.cancel_waiting(second.request_id)
    assert not sched.cancel_waiting(first.request_id)  # running, not waiting
    sched.finish(first.request_id)
    assert admitted_ids(sched.admit()) == [third.request_id]


def test_new_ids_are_unique_and_increasing() -> None:
    sched = Scheduler(max_rows=1, slot_len=SLOT_LEN, adapter_slots=1)
    ids = [sched.new_id() for _ in range(50)]
    assert ids == sorted(set(ids))


# ------------------------------------------------------------------------------------------ adapters


def test_resident_adapter_is_reused_without_reload() -> None:
    sched = Scheduler(max_rows=4, slot_len=SLOT_LEN, adapter_slots=2)
    a1 = submit(sched, "a")
    (first,) = sched.admit()
    assert first.adapter_slot == 0 and first.load_adapter and first.evicted_key is None
    a2 = submit(sched, "a")
    (second,) = sched.admit()
    assert second.adapter_slot == 0 and not second.load_adapter and second.evicted_key is None
    assert sched.adapters.refs[0] == 2
    sched.finish(a1.request_id)
    sched.finish(a2.request_id)
    assert sched.adapters.refs[0] == 0 and sched.adapters.resident() == frozenset({"a"})
    submit(sched, "a")
    (third,) = sched.admit()  # idle but still resident: no copy
    assert third.adapter_slot == 0 and not third.load_adapter
    submit(sched)
    (fourth,) = sched.admit()
    assert fourth.adapter_slot is None and not fourth.load_adapter


def test_lru_eviction_takes_the_least_recently_used_idle_slot() -> None:
    sched = Scheduler(max_rows=4, slot_len=SLOT_LEN, adapter_slots=2)
    for key in ("a", "b", "a"):  # "a" used last: "b" is the LRU one
        request = submit(sched, key)
        sched.admit()
        sched.finish(request.request_id)
    submit(sched, "c")
    (admission,) = sched.admit()
    assert admission.load_adapter and admission.evicted_key == "b"
    assert admission.adapter_slot == 1  # b's slot
    assert sched.adapters.resident() == frozenset({"a", "c"})


def test_eviction_never_takes_a_pinned_slot() -> None:
    sched = Scheduler(max_rows=4, slot_len=SLOT_LEN, adapter_slots=2)
    a = submit(sched, "a")
    sched.admit()  # "a" is oldest and pinned by a running row
    b = submit(sched, "b")
    sched.admit()
    sched.finish(b.request_id)  # "b" idle
    submit(sched, "c")
    (admission,) = sched.admit()
    assert admission.evicted_key == "b" and admission.adapter_slot == 1
    assert sched.adapters.resident() == frozenset({"a", "c"})
    assert sched.is_running(a.request_id)


def test_blocked_adapter_request_lets_others_pass_at_most_max_skips_times() -> None:
    sched = Scheduler(max_rows=8, slot_len=SLOT_LEN, adapter_slots=1, max_skips=2)
    pinned = submit(sched, "a")
    sched.admit()
    blocked = submit(sched, "b")  # its only adapter slot is pinned by "a"
    p1 = submit(sched)
    p2 = submit(sched, "a")  # a resident adapter is not blocked
    assert admitted_ids(sched.admit()) == [p1.request_id, p2.request_id]  # two admissions passed it
    stuck = submit(sched)
    assert sched.admit() == []  # its patience is used up: nobody passes it any more
    assert sched.admit() == []
    assert sched.waiting == 2 and sched.running == 3

    sched.finish(pinned.request_id)
    assert sched.admit() == []  # p2 still pins "a"
    sched.finish(p2.request_id)
    admissions = sched.admit()
    assert admitted_ids(admissions) == [blocked.request_id, stuck.request_id]  # FIFO again
    assert admissions[0].load_adapter and admissions[0].evicted_key == "a" and admissions[0].adapter_slot == 0
    assert sched.waiting == 0


def test_blocked_requests_keep_their_queue_order() -> None:
    sched = Scheduler(max_rows=8, slot_len=SLOT_LEN, adapter_slots=1, max_skips=5)
    pinned = submit(sched, "a")
    sched.admit()
    b1, b2 = submit(sched, "b"), submit(sched, "c")
    base = submit(sched)
    assert admitted_ids(sched.admit()) == [base.request_id]
    sched.finish(pinned.request_id)
    admissions = sched.admit()
    assert admitted_ids(admissions) == [b1.request_id]  # one slot: "c" waits for "b"
    assert sched.waiting == 1
    sched.finish(b1.request_id)
    assert admitted_ids(sched.admit()) == [b2.request_id]


def test_drain_adapter() -> None:
    sched = Scheduler(max_rows=4, slot_len=SLOT_LEN, adapter_slots=2)
    assert sched.drain_adapter("never-loaded") is True
    assert not sched.is_draining(None)

    # idle and resident: gone at once
    r = submit(sched, "idle")
    sched.admit()
    sched.finish(r.request_id)
    assert sched.drain_adapter("idle") is True
    assert "idle" not in sched.adapters.resident() and not sched.is_draining("idle")
    assert sorted(sched.adapters.free) == [0, 1]

    # in use: running rows keep it until they finish
    r1, r2 = submit(sched, "busy"), submit(sched, "busy")
    admissions = sched.admit()
    slot = admissions[0].adapter_slot
    assert sched.drain_adapter("busy") is False
    assert sched.is_draining("busy") and "busy" in sched.adapters.resident()
    sched.advance([r1.request_id, r2.request_id])  # rows keep stepping with it
    assert sched.finish(r1.request_id) is None
    assert sched.is_draining("busy")
    assert sched.finish(r2.request_id) == "busy"  # the last row released it
    assert not sched.is_draining("busy") and "busy" not in sched.adapters.resident()
    assert slot in sched.adapters.free
    # base rows and other adapters never report a drained key
    b = submit(sched)
    sched.admit()
    assert sched.finish(b.request_id) is None


def test_place_idle() -> None:
    slots = AdapterSlots(capacity=2)
    assert slots.place_idle("a") == (0, None)
    assert slots.place_idle("a") == (0, None)  # already resident
    assert slots.refs[0] == 0
    assert slots.place_idle("b") == (1, None)
    assert slots.place_idle("c") == (0, "a")  # LRU idle slot
    slots.acquire("b")
    slots.acquire("c")
    assert slots.place_idle("d") is None  # every slot pinned
    assert slots.resident() == frozenset({"b", "c"})


# ------------------------------------------------------------------------------------------ step shape


def test_attention_len_and_advance() -> None:
    sched = Scheduler(max_rows=4, slot_len=SLOT_LEN, adapter_slots=1)
    assert sched.attention_len() == 1
    short, long = submit(sched, prompt=5), submit(sched, prompt=12)
    sched.admit()
    assert sched.attention_len() == 13  # the prefill wrote positions 0..11; the step writes 12
    sched.advance([short.request_id, long.request_id])
    assert sched.attention_len() == 14
    for _ in range(10):
        sched.advance([short.request_id])
    assert sched.attention_len() == 17  # short (5 + 11) overtook long (12 + 1)
    sched.finish(short.request_id)
    assert sched.attention_len() == 14


def test_solver_steps_is_the_running_maximum_and_uses_adapters() -> None:
    sched = Scheduler(max_rows=4, slot_len=SLOT_LEN, adapter_slots=1)
    assert sched.solver_steps() == 1 and not sched.uses_adapters()
    a = submit(sched, steps=6)
    b = submit(sched, "lora", steps=12)
    c = submit(sched, steps=9)
    sched.admit()
    assert sched.solver_steps() == 12 and sched.uses_adapters()
    sched.finish(b.request_id)
    assert sched.solver_steps() == 9 and not sched.uses_adapters()
    sched.finish(c.request_id)
    assert sched.solver_steps() == 6
    sched.finish(a.request_id)
    assert sched.solver_steps() == 1


def test_batch_bucket() -> None:
    assert [batch_bucket(n, 64) for n in (0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 17, 33, 64)] == \
        [1, 1, 2, 4, 4, 8, 8, 12, 12, 16, 24, 48, 64]
    assert batch_bucket(3, 3) == 3  # never above max_rows
    assert batch_bucket(9, 10) == 10
    assert batch_bucket(300, 300) == 300  # beyond the table
    for max_rows in range(1, 70):
        for rows in range(1, max_rows + 1):
            bucket = batch_bucket(rows, max_rows)
            assert rows <= bucket <= max_rows
            assert bucket in batch_buckets_up_to(max_rows)


def test_batch_buckets_up_to() -> None:
    assert batch_buckets_up_to(1) == [1]
    assert batch_buckets_up_to(4) == [1, 2, 4]
    assert batch_buckets_up_to(10) == [1, 2, 4, 8, 10]
    assert batch_buckets_up_to(16) == [1, 2, 4, 8, 12, 16]
    assert batch_buckets_up_to(300) == [*BATCH_BUCKETS, 300]


def test_attention_bucket() -> None:
    assert MIN_ATTENTION_LEN == 256
    assert attention_bucket(1, 5120) == 256
    assert attention_bucket(256, 5120) == 256
    assert attention_bucket(257, 5120) == 512
    assert attention_bucket(1025, 5120) == 2048
    assert attention_bucket(5000, 5120) == 5120  # capped at the slot
    assert attention_bucket(10, 64) == 64


# ------------------------------------------------------------------------------------------ property

KEYS = (None, "a", "b", "c", "d")
operation = st.one_of(
    st.tuples(st.just("submit"), st.sampled_from(KEYS), st.integers(1, 40), st.integers(1, 40), st.integers(1, 12)),
    st.tuples(st.just("admit")),
    st.tuples(st.just("finish"), st.integers(0, 1000)),
    st.tuples(st.just("advance"), st.integers(0, 1000)),
    st.tuples(st.just("cancel"), st.integers(0, 1000)),
    st.tuples(st.just("drain"), st.sampled_from(KEYS[1:])),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_rows=st.integers(1, 6), capacity=st.integers(1, 3), max_skips=st.integers(0, 3),
       ops=st.lists(operation, max_size=80))
def test_random_sequences_keep_the_invariants(max_rows: int, capacity: int, max_skips: int, ops: list) -> None:
    sched = Scheduler(max_rows=max_rows, slot_len=64, adapter_slots=capacity, max_skips=max_skips)
    waiting: list[int] = []
    positions: dict[int, int] = {}
    for op in ops:
        kind = op[0]
        if kind == "submit":
            _, key, prompt, patches, steps = op
            request = RowRequest(sched.new_id(), key, prompt, patches, steps)
            if prompt + patches > 64:
                with pytest.raises(TooLong):
                    sched.submit(request)
                continue
            sched.submit(request)
            waiting.append(request.request_id)
        elif kind == "admit":
            admissions = sched.admit()
            for adm in admissions:
                assert adm.request.request_id in waiting
                waiting.remove(adm.request.request_id)
                positions[adm.request.request_id] = adm.request.prompt_len
                if adm.request.adapter_key is None:
                    assert adm.adapter_slot is None and not adm.load_adapter
                else:
                    assert sched.adapters.slot_of[adm.request.adapter_key] == adm.adapter_slot
            if sched.waiting and sched.running < max_rows:
                # something could not be admitted although a row is free: only adapter pressure explains it
                assert any(sched._waiting[i].adapter_key is not None for i in range(sched.waiting))
        elif kind in ("finish", "advance") and sched.running:
            ids = sched.running_ids()
            rid = ids[op[1] % len(ids)]
            if kind == "finish":
                sched.finish(rid)
                positions.pop(rid)
            else:
                sched.advance([rid])
                positions[rid] += 1
        elif kind == "cancel" and waiting:
            rid = waiting[op[1] % len(waiting)]
            assert sched.cancel_waiting(rid)
            waiting.remove(rid)
        elif kind == "drain":
            sched.drain_adapter(op[1])

        # ---- invariants
        running = sched._running
        slots = [row.row_slot for row in running.values()]
        assert len(slots) == len(set(slots)), "two running rows share a row slot"
        assert all(0 <= s < max_rows for s in slots)
        assert sched.running <= max_rows
        assert sorted(slots + sched._free_rows) == list(range(max_rows))
        assert sched.waiting == len(waiting)
        assert sched.batch_rows() == (max(slots) + 1 if slots else 0)
        assert sched.attention_len() == max(positions.values(), default=0) + 1
        adapters = sched.adapters
        assert len(adapters.slot_of) <= capacity, "more distinct adapters than slots"
        assert len(set(adapters.slot_of.values())) == len(adapters.slot_of)
        assert sorted(list(adapters.slot_of.values()) + adapters.free) == list(range(capacity))
        for key, slot in adapters.slot_of.items():
            users = [row for row in running.values() if row.adapter_slot == slot]
            assert adapters.refs.get(slot, 0) == len(users), f"refcount of {key}"
            assert all(row.request.adapter_key == key for row in users)
        for row in running.values():
            if row.adapter_slot is not None:
                assert adapters.slot_of.get(row.request.adapter_key) == row.adapter_slot
        assert adapters.draining <= set(adapters.slot_of)


def test_max_skips_counts_only_admissions_that_pass_a_blocked_request() -> None:
    """Rounds in which nobody overtakes a blocked request do not use up its patience."""
    s = Scheduler(max_rows=4, slot_len=100, adapter_slots=1, max_skips=2)
    s.submit(RowRequest(1, "a", 10, 10, 1))
    assert [a.request.request_id for a in s.admit()] == [1]  # pins the only adapter slot
    s.submit(RowRequest(2, "b", 10, 10, 1))
    assert s.admit() == [] and s.admit() == []  # blocked, but nothing passed it
    s.submit(RowRequest(3, None, 10, 10, 1))
    s.submit(RowRequest(4, None, 10, 10, 1))
    assert [a.request.request_id for a in s.admit()] == [3, 4]  # two passes: its patience is used up
    s.submit(RowRequest(5, None, 10, 10, 1))
    assert s.admit() == []  # now request 2 blocks the queue
    s.finish(1)
    assert [a.request.request_id for a in s.admit()] == [2, 5]


def test_rows_for_memory_takes_the_largest_bucket_that_fits_half_the_free_memory() -> None:
    from voxcpm_api.engine.batched.scheduler import BATCH_BUCKETS, rows_for_memory

    gib, mb = 2**30, 10**6
    # an 80 GB H100 after the weights: 128 rows of either full-size model (84 / 189 MB a row)
    assert rows_for_memory(72 * gib, 84 * mb) == 128
    assert rows_for_memory(70 * gib, 189 * mb) == 128
    # a 24 GB card with ~18 GiB free: VoxCPM2 fits 51 rows in half of it -> the 48 bucket
    assert rows_for_memory(18 * gib, 189 * mb) == 48
    assert rows_for_memory(18 * gib, 189 * mb) in BATCH_BUCKETS
    assert rows_for_memory(1 * gib, 189 * mb) == 16  # never below the floor (out-of-memory says so at load)
    assert rows_for_memory(10**15, 1, cap=64) == 64
