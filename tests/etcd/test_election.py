"""Leader election among real campaigner processes on a real three-member etcd: one leader at a
time, a standby leads within TTL + 1 s of the leader's death or pause, epochs never interleave in
the state history, and a leader cut off from etcd stops acting before its successor wins."""
import signal
import time

import pytest

from kintsugi.recovery.etcd_client import EtcdClient
from kintsugi.recovery.etcd_election import find_leader
from kintsugi.recovery.etcd_state import EtcdStateStore

TTL = 3


def _first_leader(cands, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leading = [c for c in cands if c.of("leader")]
        if leading:
            return leading
        time.sleep(0.05)
    raise AssertionError(f"nobody leads after {timeout} s: " + "; ".join(c.stderr()[-500:] for c in cands))


def _epochs_in_history(client, prefix):
    """(epoch, seq) of every state write etcd still holds, oldest first (read from its MVCC history)."""
    return [(doc["epoch"], doc["seq"]) for _, doc in reversed(list(EtcdStateStore(client, prefix).history()))]


def _assert_never_interleaved(writes):
    epochs = [e for e, _ in writes]
    assert epochs == sorted(epochs), f"writes of two leaders interleave: {writes}"
    for epoch in set(epochs):   # and each leader's own writes arrive in its order, none lost between
        seqs = [s for e, s in writes if e == epoch]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"epoch {epoch} writes out of order: {seqs}"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill", "stop"])
def test_standby_leads_within_ttl_plus_1s(shared_etcd, campaigners, sig):
    prefix = f"/test/elect-{sig.name}/"
    cands = [campaigners.start(shared_etcd.endpoints, prefix, f"c{i}", ttl=TTL,
                               args=["--rejoin", "--save-every", "0.05", "--address", f"10.0.0.{i}:29400"])
             for i in range(3)]
    old = _first_leader(cands)
    time.sleep(0.5)   # the others keep campaigning meanwhile
    assert len([c for c in cands if c.of("leader")]) == 1, [c.events for c in cands]
    old = old[0]
    first = old.of("leader")[0]
    client = EtcdClient(shared_etcd.endpoints)
    seen = find_leader(client, prefix)
    assert (seen.epoch, seen.candidate, seen.address) == (first["epoch"], old.name, f"10.0.0.{old.name[1]}:29400")

    t_fault = time.monotonic()
    old.signal(sig)
    standbys = [c for c in cands if c is not old]
    new = _first_leader(standbys, timeout=TTL + 10)
    assert len(new) == 1, [c.events for c in standbys]
    won = new[0].of("leader")[0]
    took = won["t"] - t_fault
    assert took <= TTL + 1.0, f"standby led {took:.2f} s after the leader's {sig.name} (TTL {TTL} s)"
    assert won["epoch"] == first["epoch"] + 1

    if sig == signal.SIGSTOP:
        old.signal(signal.SIGCONT)
        old.wait("lost", timeout=TTL + 5)
        time.sleep(TTL / 2)       # it campaigns again (--rejoin) but only as a standby
        assert len(old.of("leader")) == 1, old.events
    time.sleep(0.5)
    assert len(new[0].of("leader")) == 1 and not new[0].of("lost")
    assert find_leader(client, prefix).epoch == won["epoch"]
    writes = _epochs_in_history(client, prefix)
    assert {e for e, _ in writes} == {first["epoch"], won["epoch"]}
    _assert_never_interleaved(writes)


@pytest.mark.slow
def test_partitioned_leader_stops_acting_before_successor_wins(etcd_available, namespace, campaigners):
    """The leader runs in a network namespace and loses its link to every etcd member for longer
    than the TTL. It must give up leading (its `lost` time) before the standby wins (its `leader`
    time), both on the system-wide monotonic clock; once healed it rejoins as a standby."""
    from kintsugi.recovery.etcd_local import LocalEtcd
    with LocalEtcd(3, extra_host=namespace.host_ip) as cluster:
        prefix = "/test/partition/"
        remote = [e.replace("127.0.0.1", namespace.host_ip) for e in cluster.endpoints]
        a = campaigners.start(remote, prefix, "a", ttl=TTL, netns=namespace.ns,
                              args=["--rejoin", "--save-every", "0.05"])
        a.wait("leader", timeout=15)
        b = campaigners.start(cluster.endpoints, prefix, "b", ttl=TTL, args=["--rejoin", "--save-every", "0.05"])
        b.wait("candidate", timeout=15)
        time.sleep(0.5)
        assert not b.of("leader")

        namespace.partition()
        won = b.wait("leader", timeout=TTL + 10)
        lost = a.wait("lost", timeout=TTL + 10)
        assert lost["at"] < won["t"], (f"the partitioned leader gave up at {lost['at']:.3f}, after its successor "
                                       f"won at {won['t']:.3f}")
        time.sleep(TTL)           # partitioned longer than the TTL
        namespace.heal()
        time.sleep(TTL + 1)       # it reconnects, campaigns, and finds b leading
        assert len(a.of("leader")) == 1 and len(b.of("leader")) == 1 and not b.of("lost"), (a.events, b.events)
        client = EtcdClient(cluster.endpoints)
        assert find_leader(client, prefix).candidate == "b"
        writes = _epochs_in_history(client, prefix)
        assert {e for e, _ in writes} == {1, 2}
        _assert_never_interleaved(writes)
