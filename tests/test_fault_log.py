"""The fault log (backend/process_group/fault_log.hpp) on CPU, without a group: ranks' records in a
store, and what a rank's error gains from them. On CUDA paths a rank that stops because the peer
it waited for stopped first must still name the first cause: across nodes, rank 3 waits for rank
0, which waited for rank 1, which died."""
import threading
import time

import pytest
import torch.distributed as dist

from torch_ep import _C

from test_faults import _names_dead_peer

PREFIX = "ep/fault/0/"
# rank 3's error in the GPU run that lost the cause (rank 1 was SIGKILLed, TORCH_EP_TIMEOUT_S=3)
RANK3 = ("check_errors on rank 3: rank 3's internode (NVSHMEM) exchange (in all_to_all_single) waited past the "
         "timeout (3000 ms) for rank 0 (it never came, or the ranks disagree on a message's size); its signals "
         "are out of step since, so this group takes no more internode calls")
RANK0 = "all_to_all_single: rank 0 stopped because peer rank 1 exited (its process 4242 is gone)"
GRACE_S = 0.5


def logs(store, size=4, prefix=PREFIX):
    return [_C._FaultLog(store, prefix, r, size) for r in range(size)]


def timed(call, *args):
    start = time.monotonic()
    out = call(*args)
    return time.monotonic() - start, out


@pytest.mark.parametrize("message,rank,peer", [
    (RANK3, 3, 0),
    (RANK0, 0, 1),
    # a watchdog's list of every peer of the op names none of them as the one waited for
    ("all_to_all_single: timed out on rank 2 after 3050 ms waiting for peer rank(s) 0, 1, 3: ...", 2, -1),
    ("all_to_all_single: timed out on rank 0 after 3050 ms waiting for peer rank(s) 0, 3: ...", 0, 3),
    ("dispatch: the ranks' split sizes disagree", 0, -1),
    ("operand rank 2 mismatch", 2, -1),
])
def test_first_peer_named(message, rank, peer):
    assert _C._first_peer_named(message, rank) == peer


def test_a_cascade_names_the_first_cause_and_the_dead_rank():
    log = logs(dist.HashStore())
    log[0].record(RANK0)
    elapsed, error = timed(log[3].report, RANK3)
    assert error.startswith(RANK3)
    assert "rank 0 had stopped first: " + RANK0 in error, error
    assert error.endswith("; rank 1 recorded no error (it may have died)"), error
    assert _names_dead_peer(error, 1), error
    assert elapsed < GRACE_S, "the peer had recorded: no grace to wait"
    # The first cause's own rank adds nothing: the rank it names left no record, and nothing
    # came before it.
    assert log[0].explain(RANK0) == RANK0


def test_a_record_made_without_waiting_lands():
    log = logs(dist.HashStore())
    log[0].record(RANK0, False)
    assert "rank 0 had stopped first: " + RANK0 in log[3].report(RANK3)


def test_a_peer_that_records_a_little_later_is_waited_for():
    log = logs(dist.HashStore())
    threading.Timer(0.2, log[0].record, (RANK0,)).start()
    elapsed, error = timed(log[3].report, RANK3)
    assert "rank 0 had stopped first" in error and _names_dead_peer(error, 1), error
    assert 0.15 < elapsed < GRACE_S + 0.5


def test_without_records_the_message_stays_and_the_answer_is_reused():
    log = logs(dist.HashStore())
    elapsed, error = timed(log[3].report, RANK3)
    assert error == RANK3
    assert GRACE_S - 0.1 < elapsed < GRACE_S + 1.0
    elapsed, error = timed(log[3].explain, "all_to_all_single: rank 3 waited for rank 0 again")
    assert error.endswith("again") and elapsed < 0.1, "one wait per peer"


def test_a_peer_that_stopped_because_of_this_rank_adds_nothing():
    log = logs(dist.HashStore())
    log[0].record("all_to_all_single: rank 0 expects 12 bytes from rank 3, but rank 3 sends 8 bytes")
    assert log[3].report("all_to_all_single: rank 3 sends 8 bytes to rank 0, which expects 12") == \
        "all_to_all_single: rank 3 sends 8 bytes to rank 0, which expects 12"


def test_a_long_chain_is_followed_to_its_end_and_kept_short():
    log = logs(dist.HashStore(), size=8)
    log[0].record("combine: rank 0 waited for rank 2")
    log[2].record("combine: rank 2 waited for rank 6")
    log[6].record("combine: rank 6 waited for rank 5")
    log[5].record("combine: rank 5 stopped because peer rank 1 exited (its process 7 is gone)")
    error = log[3].report("combine: rank 3 waited for rank 0")
    assert error == ("combine: rank 3 waited for rank 0; rank 0 had stopped first, after rank 2, ..., which had "
                     "stopped after rank 5: combine: rank 5 stopped because peer rank 1 exited (its process 7 is "
                     "gone); rank 1 recorded no error (it may have died)"), error
    assert _names_dead_peer(error, 1)


def test_where_the_peer_recorded_nothing_an_earlier_record_stands_in():
    log = logs(dist.HashStore())
    log[2].record("all_to_all_single: rank 2 stopped because peer rank 1 exited (its process 9 is gone)")
    error = log[3].report(RANK3)
    assert "; rank 0 recorded no error, but rank 2 had stopped first: all_to_all_single: rank 2 stopped " \
           "because peer rank 1 exited" in error, error
    assert _names_dead_peer(error, 1)


def test_only_the_first_error_is_recorded_and_groups_never_meet():
    store = dist.HashStore()
    log = logs(store, prefix=_C._fault_instance_prefix(store, 0))
    log[0].record(RANK0)
    log[0].record("all_to_all_single: rank 0 waited for rank 2")
    assert "rank 0 had stopped first: " + RANK0 in log[3].report(RANK3)
    other = logs(store, prefix=_C._fault_instance_prefix(store, 0))  # the next instance of the group
    assert other[3].report(RANK3) == RANK3


def test_a_peer_that_records_after_the_grace_is_found_at_the_next_error():
    log = logs(dist.HashStore())
    assert log[3].report(RANK3) == RANK3
    log[0].record(RANK0)
    elapsed, error = timed(log[3].explain, RANK3)
    assert "rank 0 had stopped first: " + RANK0 in error, "a miss is not kept: " + error
    assert elapsed < GRACE_S, "the grace for rank 0 was spent once already"


def test_a_fellow_victim_does_not_stand_in_and_a_gone_peer_is_not_waited_for():
    log = logs(dist.HashStore())
    log[0].record(RANK0)
    mine = "all_to_all_single: rank 3 stopped because peer rank 1 exited (its process 4242 is gone)"
    elapsed, error = timed(log[3].report, mine)
    assert error == mine, "rank 0 only saw the same death: " + error
    assert elapsed < GRACE_S, "a peer seen gone records nothing: no grace"


def test_ranks_agree_on_the_instance_whatever_the_order():
    store = dist.HashStore()
    first = [_C._fault_instance_prefix(store, r) for r in (0, 1, 2, 3)]
    second = [_C._fault_instance_prefix(store, r) for r in (3, 1, 0, 2)]  # another order
    third_rank2_early = _C._fault_instance_prefix(store, 2)
    assert len(set(first)) == 1 and len(set(second)) == 1 and first[0] != second[0]
    assert third_rank2_early not in (first[0], second[0])
    assert [_C._fault_instance_prefix(store, r) for r in (0, 1, 3)] == [third_rank2_early] * 3


class HangingStore(dist.Store):
    """A store whose host is gone: every call hangs (for a while: the helper thread then ends)."""

    def __init__(self, hang_s):
        super().__init__()
        self.hang_s = hang_s

    def _hang(self, *args):
        time.sleep(self.hang_s)
        raise RuntimeError("store unreachable")

    set = get = add = check = wait = _hang


def test_a_store_that_does_not_answer_costs_one_deadline():
    watchdog = _C._FaultLog(HangingStore(3.0), PREFIX, 3, 4)
    elapsed, _ = timed(watchdog.record, RANK0, False)
    assert elapsed < 0.1, "a watchdog's record waits for no store"
    log = _C._FaultLog(HangingStore(3.0), PREFIX, 3, 4)
    elapsed, _ = timed(log.record, RANK0)
    assert elapsed < 1.5
    elapsed, error = timed(log.explain, RANK3)
    assert error == RANK3 and elapsed < 0.1, "a store found unreachable is not asked again"
    fresh = _C._FaultLog(HangingStore(3.0), PREFIX, 3, 4)
    elapsed, error = timed(fresh.explain, RANK3)
    assert error == RANK3 and elapsed < 2.0
    time.sleep(3.5)  # the helper threads end before the interpreter does
