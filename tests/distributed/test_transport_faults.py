"""Transport semantics with a real peer process and real signals, on the plain path and on the host-
staged path that CUDA stages use over gloo (a CPU `HostStager` runs the same sender thread and
buffer pool here):

- a SIGKILLed peer makes a blocked receive raise PeerFailure naming it within milliseconds;
- a SIGSTOPped peer is abandoned when the abort event fires (Aborted), on a receive and on a flush
  of a send it will never read;
- a killed peer makes the next flush of a staged send raise PeerFailure;
- staged round trips deliver exactly what was sent (fp32) or what the codec delivers (int8)."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from testkit import ROOT
from kintsugi.compression.api import get_codec
from kintsugi.parallel.device import HostStager
from kintsugi.parallel.groups import Aborted, form_group
from kintsugi.parallel.transport import PeerFailure, Transport

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

PEER = r'''
import sys, threading, time, torch, torch.distributed as dist
from datetime import timedelta
from kintsugi.compression.api import get_codec
from kintsugi.parallel.device import HostStager
from kintsugi.parallel.groups import form_group
from kintsugi.parallel.transport import Transport
torch.set_num_threads(1)
port, mode, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
connect = lambda: dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False, use_libuv=True,
                                timeout=timedelta(seconds=60))
group = form_group(connect, "t/0", 1, 2, 60.0)
codecs = {"p2p": get_codec("int8", 32)} if mode == "echo_int8" else {}
t = Transport(group, abort=threading.Event(), codecs=codecs, stager=HostStager(torch.device("cpu")))
if mode.startswith("echo"):
    for i in range(n):
        x = t.recv((64, 16), 0, i)
        t.send(x * 2, 0, 1000 + i)
    t.flush()
    t.recv((1,), 0, 9999, channel="control")  # the test's goodbye: keeps the pairs open until it is done
else:  # quiet: formed, then never sends (the test kills or stops this process)
    connect().set("ready", "1")
    time.sleep(600)
'''


@pytest.fixture()
def peer():
    """start(mode, n) -> (rank 0's Group, the peer's Popen); everything is torn down afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, use_libuv=True)
    procs, groups = [], []

    def start(mode, n=0):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, "-c", PEER, str(port), mode, str(n)], cwd=ROOT, env=env)
        procs.append(proc)
        connect = lambda: dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,  # noqa: E731
                                        use_libuv=True, timeout=timedelta(seconds=60))
        group = form_group(connect, "t/0", 0, 2, 60.0)
        groups.append(group)
        if mode == "quiet":
            master.wait(["ready"], timedelta(seconds=30))
        return group, proc

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
        p.wait(10)
    for g in groups:
        g.close()


def _stager():
    return HostStager(torch.device("cpu"))


@pytest.mark.parametrize("staged", [False, True])
def test_a_killed_peer_raises_within_milliseconds(peer, staged):
    group, proc = peer("quiet")
    t = Transport(group, abort=threading.Event(), stager=_stager() if staged else None)
    killed_at = []

    def kill():
        killed_at.append(time.monotonic())
        proc.kill()
    threading.Timer(0.3, kill).start()
    with pytest.raises(PeerFailure) as e:
        t.recv((64, 16), 1, 0)
    latency = time.monotonic() - killed_at[0]
    assert e.value.peer == 1
    assert latency < 0.5, f"PeerFailure {latency * 1e3:.0f} ms after the SIGKILL"
    # The next send to the dead peer fails at once (plain: gloo knows the pair is broken) or, staged
    # (posted by the sender thread), at the flush, not later.
    with pytest.raises(PeerFailure):
        t.send(torch.ones(64, 16), 1, 5)
        t.flush()


@pytest.mark.parametrize("staged", [False, True])
def test_a_stopped_peer_is_abandoned_when_the_abort_fires(peer, staged):
    group, proc = peer("quiet")
    proc.send_signal(signal.SIGSTOP)
    abort = threading.Event()
    t = Transport(group, abort=abort, stager=_stager() if staged else None)
    threading.Timer(0.3, abort.set).start()
    t0 = time.monotonic()
    with pytest.raises(Aborted):
        t.recv((64, 16), 1, 0)
    assert 0.25 <= time.monotonic() - t0 < 1.0
    # A send the stopped peer never reads (32 MB: more than the socket buffers hold) is abandoned too.
    abort2 = threading.Event()
    t2 = Transport(group, abort=abort2, stager=_stager() if staged else None)
    t2.send(torch.ones(8 << 20), 1, 6)
    threading.Timer(0.3, abort2.set).start()
    t0 = time.monotonic()
    with pytest.raises(Aborted):
        t2.flush()
    assert 0.25 <= time.monotonic() - t0 < 1.5


@pytest.mark.parametrize("codec", [None, "int8"])
def test_staged_round_trips_deliver_what_was_sent(peer, codec):
    n = 6
    group, proc = peer("echo_int8" if codec else "echo", n)
    codecs = {"p2p": get_codec(codec, 32)} if codec else {}
    stager = _stager()
    t = Transport(group, abort=threading.Event(), codecs=codecs, stager=stager)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, 16, generator=gen) for _ in range(n)]
    got = []
    for i, x in enumerate(xs):  # as a stage does: what it received stays alive while it sends more
        t.post_recv((64, 16), 1, 1000 + i)  # posted before the peer can answer
        t.send(x, 1, i)
        got.append(t.recv((64, 16), 1, 1000 + i))
    t.flush()
    for x, y in zip(xs, got):
        if codec is None:
            assert torch.equal(y, 2 * x)
        else:  # each hop delivers what the codec's decode of its encode gives
            c = get_codec(codec, 32)
            hop1 = c.decode(c.encode(x), x.numel()).view_as(x)
            assert torch.equal(y, c.decode(c.encode(2 * hop1), x.numel()).view_as(x))
            assert not torch.equal(y, 2 * x)
    # Send buffers went back to the pool at flush: the next one of that size is not a new allocation.
    wire = (get_codec(codec, 32).encoded_nbytes(64 * 16), torch.uint8) if codec else (64 * 16, torch.float32)
    before = stager.allocated
    stager.host_buffer(*wire)
    assert stager.allocated == before
    t.send(torch.zeros(1, dtype=torch.float32), 1, 9999, channel="control")
    t.flush()
    assert proc.wait(30) == 0
