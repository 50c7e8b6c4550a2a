"""The control plane over a degraded etcd: one member of three lost changes nothing visible; two
lost stop every control write (with one clear error) until a member returns."""
import time

import pytest

from etcd_helpers import raft_leader
from kintsugi.recovery.etcd_client import EtcdClient
from kintsugi.recovery.etcd_election import Election
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
    worst, n, until = 0.0, 0, time.monotonic() + 4.0
    while time.monotonic() < until:   # a coordinator saving on every change, 20 times a second
        n += 1
        started = time.monotonic()
        store.save({"n": n})
        worst = max(worst, time.monotonic() - started)
        assert election.is_leader
        time.sleep(0.05)
    assert not lost and election.is_leader
    assert EtcdStateStore(EtcdClient(endpoints[1:]), prefix).load() == {"n": n}
    assert worst < 2.5, f"a save took {worst:.2f} s while one member was down"
    election.close()


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
    assert a.lost.wait(5.0), "the leader kept leading through an outage longer than its TTL"
    assert not a.is_leader
    etcd_cluster.restart(1)
    etcd_cluster.wait_healthy(20, members=[0, 1])
    started = time.monotonic()
    assert a.campaign(timeout_s=10)
    took = time.monotonic() - started
    assert a.epoch == 2 and took < 1.5, f"re-elected after {took:.2f} s with epoch {a.epoch}"
    a.close()
