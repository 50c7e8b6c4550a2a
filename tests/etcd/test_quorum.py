"""The control plane over a degraded etcd: one member of three lost changes nothing visible; two
lost stop every control write (with one clear error) until a member returns."""
import signal
import time

import pytest

from etcd_helpers import raft_leader
from kintsugi.recovery.etcd_client import EtcdClient
from kintsugi.recovery.etcd_election import Election, find_leader
from kintsugi.recovery.etcd_state import EtcdStateStore
from kintsugi.recovery.state_store import Unavailable


def test_one_member_killed_nothing_visible(etcd_cluster):
    """Kill the member the coordinator talks to, which is also etcd's raft leader: saves go on
    (another member, a raft election), the coordinator never stops leading."""
    prefix = "/test/one-down/"
    lead = raft_leader(etcd_cluster)
    endpoints = [etcd_cluster.endpoints[lead]] + [e for i, e in enumerate(etcd_cluster.endpoints) if i != lead]
    lost = []
    election = Election(EtcdClient(endpoints), prefix, ttl_s=3, candidate="a", on_lost=lambda: lost.append(1))
    store = EtcdStateStore(election.client, prefix, election)
    assert election.campaign(timeout_s=10)
    store.save({"n": 0})
    etcd_cluster.kill(lead)
    # A coordinator saving on every change, 20 times a second. While etcd elects a new raft leader
    # (1-2 s, more on a loaded machine) a save may wait, or fail as Unavailable, which the
    # coordinator retries; what must not happen is a lost leadership.
    worst, n, last_saved, until = 0.0, 0, time.monotonic(), time.monotonic() + 6.0
    while time.monotonic() < until:
        n += 1
        try:
            store.save({"n": n})
        except Unavailable:
            n -= 1
        else:
            worst, last_saved = max(worst, time.monotonic() - last_saved), time.monotonic()
        time.sleep(0.05)
    assert not lost and election.confirm(timeout_s=0) and election.epoch == 1
    assert EtcdStateStore(EtcdClient(endpoints[1:]), prefix).load() == {"n": n}
    assert worst < 5.0, f"no save went through for {worst:.2f} s while one member was down"
    election.close()


def test_etcd_leaderless_past_the_lease_deadline_suspends_then_resumes(etcd_cluster):
    """etcd has no raft leader for longer than the coordinator's lease deadline (its leader killed,
    one survivor paused 4.6 s): the coordinator cannot renew and stops acting at its deadline, but
    etcd extends every lease when a new raft leader takes over, so the leadership resumes - same
    epoch, no `on_lost`, saves go on - rather than handing a run it still holds to a standby."""
    prefix = "/test/leaderless/"
    lead = raft_leader(etcd_cluster)
    others = [i for i in range(3) if i != lead]
    lost = []
    # A grace of 10 s: the paused member's return, etcd's election and a renewal that may first try
    # the paused member all fit, even on a loaded machine.
    a = Election(EtcdClient(etcd_cluster.endpoints), prefix, ttl_s=5, candidate="a", on_lost=lambda: lost.append(1),
                 grace_s=10)
    store = EtcdStateStore(a.client, prefix, a)
    assert a.campaign(timeout_s=10) and a.epoch == 1
    store.save({"n": 0})
    killed = time.monotonic()
    etcd_cluster.kill(lead)
    etcd_cluster.signal(others[0], signal.SIGSTOP)
    suspended = False
    try:
        while time.monotonic() < killed + 4.6:    # past the deadline (TTL - margin = 4.5 s at most)
            suspended = suspended or not a.is_leader
            time.sleep(0.02)
    finally:
        etcd_cluster.signal(others[0], signal.SIGCONT)
    assert suspended, "the coordinator kept acting with no renewal for longer than its lease deadline"
    assert a.confirm(timeout_s=a.grace_s), "the leadership was given up although etcd kept its lease"
    store.save({"n": 1})
    assert not lost and a.epoch == 1 and find_leader(a.client, prefix).candidate == "a"
    assert EtcdStateStore(EtcdClient(etcd_cluster.endpoints), prefix).load() == {"n": 1}
    b = Election(EtcdClient(etcd_cluster.endpoints), prefix, ttl_s=5, candidate="b")
    assert not b.campaign(timeout_s=1.0)
    a.close()
    b.close()


def test_two_members_killed_no_write_until_quorum_returns(etcd_cluster):
    prefix = "/test/two-down/"
    a = Election(EtcdClient(etcd_cluster.endpoints), prefix, ttl_s=10, candidate="a")
    store = EtcdStateStore(a.client, prefix, a)
    assert a.campaign(timeout_s=10)
    store.save({"gen": 1})
    etcd_cluster.kill(1)
    etcd_cluster.kill(2)

    with pytest.raises(Unavailable) as err:           # not written; the lease decides who leads
        store.save({"gen": 2, "lost": [[0, 1]]})       # e.g. a worker failed during the outage
    message = str(err.value)
    assert "\n" not in message and all(e in message for e in etcd_cluster.endpoints), message
    assert "recovery.etcd.endpoints" in message
    # Nobody else can take over meanwhile: no membership change of any kind can happen.
    b = Election(EtcdClient(etcd_cluster.endpoints), prefix, ttl_s=10, candidate="b")
    assert not b.campaign(timeout_s=2.0)

    etcd_cluster.restart(1)
    etcd_cluster.wait_healthy(20, members=[0, 1])
    store.save({"gen": 2, "lost": [[0, 1]]})            # the failure is handled once quorum returns
    assert a.is_leader and a.epoch == 1
    assert EtcdStateStore(EtcdClient(etcd_cluster.endpoints), prefix).load() == {"gen": 2, "lost": [[0, 1]]}
    a.close()
    b.close()


def test_outage_longer_than_ttl_deposes_then_a_new_epoch_leads_at_once(etcd_cluster):
    """An outage longer than the TTL: the leader gives up (it cannot tell it from a partition).
    When quorum returns, its old lease (which etcd extends on a raft leader change) is revoked, so
    a campaign wins at once with the next epoch instead of a TTL later."""
    prefix = "/test/long-outage/"
    a = Election(EtcdClient(etcd_cluster.endpoints), prefix, ttl_s=3, candidate="a")
    assert a.campaign(timeout_s=10) and a.epoch == 1
    etcd_cluster.kill(1)
    etcd_cluster.kill(2)
    # etcd's raft leader renews leases by itself until it notices the lost quorum (its election
    # timeout, 1 s by default, more on a loaded host), so the last renewal can come after the kills.
    killed = time.monotonic()
    while a.is_leader and time.monotonic() < killed + 5.0:   # that, then the deadline: TTL - margin
        time.sleep(0.02)
    assert not a.is_leader, "the leader kept acting past its lease deadline"
    assert not a.confirm(timeout_s=0.5)                       # suspended: waits, then still does not lead
    # It cannot tell the outage from a partition: once the grace passes it gives the run up, dated
    # from its deadline (when it stopped acting), not from when it gave up.
    assert a.lost.wait(3.0 + a.grace_s + 1.0), "the leader never gave up through an outage longer than its TTL"
    assert a.lost_at <= killed + 5.0
    etcd_cluster.restart(1)
    etcd_cluster.wait_healthy(20, members=[0, 1])
    started = time.monotonic()
    assert a.campaign(timeout_s=10)
    took = time.monotonic() - started
    assert a.epoch == 2 and took < 1.5, f"re-elected after {took:.2f} s with epoch {a.epoch}"
    a.close()
