"""Fencing: a leader whose lease is gone on the server can change nothing, even while its own
clock still says it leads (a partition, a pause, a slow renewal thread)."""
import pytest

from kintsugi.recovery.etcd_client import EtcdClient
from kintsugi.recovery.etcd_election import Election, find_leader
from kintsugi.recovery.etcd_state import EtcdStateStore
from kintsugi.recovery.state_store import Fenced


def test_deposed_leader_cannot_write(shared_etcd):
    prefix = "/test/fence/"
    # A long TTL keeps A's local deadline far away: only the server's compare can stop it.
    a = Election(EtcdClient(shared_etcd.endpoints), prefix, ttl_s=30, candidate="a")
    b = Election(EtcdClient(shared_etcd.endpoints), prefix, ttl_s=30, candidate="b")
    store_a = EtcdStateStore(a.client, prefix, a)
    store_b = EtcdStateStore(b.client, prefix, b)
    assert a.campaign(timeout_s=10) and a.epoch == 1
    a.publish("10.0.0.1:29400")
    store_a.save({"plan": "from a", "gen": 1})

    # The server drops A's lease (as at expiry) while A's renewal thread sleeps: A still believes.
    admin = EtcdClient(shared_etcd.endpoints)
    admin.revoke(a._lease)
    assert b.campaign(timeout_s=10) and b.epoch == 2
    store_b.save({"plan": "from b", "gen": 2})
    assert a.is_leader, "the test needs A to believe it leads"

    with pytest.raises(Fenced, match="epoch 2 .b. leads now"):
        store_a.save({"plan": "stale, from a", "gen": 2})
    assert not a.is_leader and a.lost.is_set()
    with pytest.raises(Fenced):
        a.publish("10.0.0.1:29400")

    # What etcd holds is B's, untouched, and its history has no write of A after B's first.
    fresh = EtcdStateStore(admin, prefix)
    assert fresh.load() == {"plan": "from b", "gen": 2} and fresh.last_epoch == 2
    assert [doc["epoch"] for _, doc in fresh.history()] == [2, 1]
    leader = find_leader(admin, prefix)
    assert (leader.epoch, leader.candidate, leader.address) == (2, "b", None)
    a.close()
    b.close()


def test_resign_hands_over_at_once_and_epochs_never_repeat(shared_etcd):
    """A leader that resigns (or dies) before writing anything still used up its epoch: the next
    leader's epoch is higher, so an incarnation derived from it is never reused."""
    import time
    prefix = "/test/resign/"
    elections = [Election(EtcdClient(shared_etcd.endpoints), prefix, ttl_s=10, candidate=f"c{i}") for i in range(3)]
    epochs = []
    for e in elections:
        started = time.monotonic()
        assert e.campaign(timeout_s=5), "the previous leader resigned: the key must be free at once"
        assert time.monotonic() - started < 2.0
        epochs.append(e.epoch)
        e.resign()
        assert not e.is_leader
    assert epochs == [1, 2, 3]
    assert find_leader(EtcdClient(shared_etcd.endpoints), prefix) is None
    for e in elections:
        e.close()


def test_racing_candidates_exactly_one_wins(shared_etcd):
    """Eight candidates read "nobody leads" at the same moment and all try to win: one does, each
    round, and the epochs count rounds (one per win, none skipped or repeated)."""
    import threading
    prefix = "/test/race/"
    elections = [Election(EtcdClient(shared_etcd.endpoints), prefix, ttl_s=10, candidate=f"c{i}") for i in range(8)]
    for e in elections:      # leases first, so that the race is in the winning transaction alone
        e._grant()
    winners_by_round = []
    for round_ in range(5):
        barrier = threading.Barrier(len(elections))
        won = [False] * len(elections)

        def run(i):
            barrier.wait()
            won[i] = elections[i]._try_win()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(elections))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        winners = [elections[i] for i, w in enumerate(won) if w]
        assert len(winners) == 1, f"round {round_}: {[w.candidate for w in winners]} all won"
        winners_by_round.append(winners[0].epoch)
        assert find_leader(EtcdClient(shared_etcd.endpoints), prefix).candidate == winners[0].candidate
        winners[0].resign()
        winners[0]._grant()
    assert winners_by_round == [1, 2, 3, 4, 5]
    for e in elections:
        e.close()


def test_workers_find_the_next_leader(shared_etcd):
    """What a worker whose coordinator went away does: wait for a leader newer than the one it knew
    that has published its store address."""
    import threading
    import time
    from kintsugi.recovery.etcd_election import wait_for_leader
    prefix = "/test/find/"
    reader = EtcdClient(shared_etcd.endpoints)
    assert wait_for_leader(reader, prefix, timeout_s=0.5, poll_s=0.05) is None     # nobody leads yet
    a = Election(EtcdClient(shared_etcd.endpoints), prefix, ttl_s=10, candidate="a")
    assert a.campaign(timeout_s=10)
    assert wait_for_leader(reader, prefix, timeout_s=0.5, poll_s=0.05) is None     # no address yet
    a.publish("10.0.0.1:29400")
    found = wait_for_leader(reader, prefix, timeout_s=5, poll_s=0.05)
    assert (found.epoch, found.address) == (1, "10.0.0.1:29400")
    # The worker knew epoch 1; it waits while a leads, and gets b once b has taken over and published.
    assert wait_for_leader(reader, prefix, newer_than=1, timeout_s=0.5, poll_s=0.05) is None
    b = Election(EtcdClient(shared_etcd.endpoints), prefix, ttl_s=10, candidate="b")
    result = {}
    waiter = threading.Thread(target=lambda: result.update(
        info=wait_for_leader(reader.clone(), prefix, newer_than=1, timeout_s=20, poll_s=0.05)))
    waiter.start()
    a.resign()
    assert b.campaign(timeout_s=10)
    time.sleep(0.3)
    assert waiter.is_alive(), "b has not published its address yet"
    b.publish("10.0.0.2:29400")
    waiter.join(10)
    assert (result["info"].epoch, result["info"].candidate, result["info"].address) == (2, "b", "10.0.0.2:29400")
    a.close()
    b.close()


def test_a_worker_learns_from_etcd_that_the_run_ended(shared_etcd):
    """A worker away from its store when the last leader closed it: the state in etcd says whether
    the run is still going (a later node joins it) or ended (the worker stops instead of waiting
    out recovery.coordinator_wait_s for a leader that will never come)."""
    import time
    from kintsugi.recovery.etcd_client import EtcdSettings
    from kintsugi.recovery.etcd_locate import Locator
    prefix = "/test/ended/"
    loc = Locator(EtcdSettings(endpoints=tuple(shared_etcd.endpoints), prefix=prefix))
    assert loc.run_state() is None and loc.ended() is None          # no run there yet
    a = Election(EtcdClient(shared_etcd.endpoints), prefix, ttl_s=10, candidate="a")
    assert a.campaign(timeout_s=10)
    store = EtcdStateStore(EtcdClient(shared_etcd.endpoints), prefix, election=a, flush_s=0.05)
    store.save({"committed": {"0": 3}, "ended": None})
    time.sleep(1.05)                                                 # it reads at most once a second
    assert loc.run_state() == "running" and loc.ended() is None
    store.save({"committed": {"0": 9}, "ended": "finished"})
    time.sleep(1.05)
    assert loc.ended() == "finished"
    a.resign()
