"""parallel.waiter against real gloo groups (two ranks on threads of this process, formed with
form_group over a real TCPStore): one long-lived waiter serves every wait of a transport, an
abandoned wait never delays the next one, pollable works (gloo collectives, like NCCL's) finish,
miss their deadline or abort on the caller's thread, and an abort that hangs ends the process."""
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
from kintsugi.parallel.groups import Aborted, form_group
from kintsugi.parallel import waiter as waiter_mod
from kintsugi.parallel.transport import Transport, wait_abortable
from kintsugi.parallel.waiter import EXIT_ABORT_HUNG, PeerFailure, WaiterSlot, call_with_deadline, poll_works

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]


@pytest.fixture()
def pair():
    """Two formed ranks of one gloo group, {rank: Group}; closed afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, use_libuv=True)

    def connect():
        return dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False, use_libuv=True,
                             timeout=timedelta(seconds=30))
    groups = {}
    threads = [threading.Thread(target=lambda r=r: groups.__setitem__(r, form_group(connect, "w/0", r, 2, 60.0)))
               for r in range(2)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert set(groups) == {0, 1}
    yield groups
    for g in groups.values():
        g.close()
    del master


def test_one_waiter_thread_serves_every_wait(pair, monkeypatch):
    n = 40
    t0 = Transport(pair[0], abort=threading.Event())
    t1 = Transport(pair[1], abort=None)  # the sender waits inline
    sender = threading.Thread(target=lambda: [t1.send(torch.full((8,), float(i)), 0, i) or t1.flush()
                                              for i in range(n)])
    started = []
    real_start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self.name) or real_start(self))
    sender.start()
    got = [t0.recv((8,), 1, i) for i in range(n)]
    sender.join(10)
    monkeypatch.setattr(threading.Thread, "start", real_start)
    assert [float(g[0]) for g in got] == [float(i) for i in range(n)]
    mine = [name for name in started if name != sender.name]
    assert len(mine) == 1, f"{n} waits started threads {mine}: expected one long-lived waiter"


def test_an_abandoned_wait_never_delays_the_next(pair):
    slot = WaiterSlot()
    stuck = pair[0].irecv(torch.zeros(4), 1, 99)  # rank 1 never sends tag 99
    abort = threading.Event()
    threading.Timer(0.2, abort.set).start()
    with pytest.raises(Aborted):
        slot.get().wait([(stuck, 1)], abort)
    # The first waiter's thread is still blocked in gloo; the next wait must not queue behind it.
    work = pair[0].irecv(torch.zeros(4), 1, 7)
    send = pair[1].isend(torch.ones(4), 0, 7)  # kept: a dropped work handle cancels its send
    t = time.monotonic()
    slot.get().wait([(work, 1)], threading.Event())
    assert time.monotonic() - t < 1.0 and slot.started == 2
    send.wait()


def test_pollable_works_finish_miss_their_deadline_or_abort(pair):
    a, b = torch.ones(3), torch.full((3,), 2.0)
    w0 = pair[0].all_reduce(a)
    threading.Thread(target=lambda: pair[1].all_reduce(b).wait()).start()
    poll_works([(w0, 1)], deadline_s=10.0)
    assert a.tolist() == [3.0, 3.0, 3.0]  # 1 + 2, worked by hand
    # Rank 1 never joins the next all-reduce: its deadline names it, well before gloo's 60 s.
    late = pair[0].all_reduce(torch.ones(3))
    t = time.monotonic()
    with pytest.raises(PeerFailure) as e:
        poll_works([(late, 1, time.monotonic())], deadline_s=0.3)
    assert e.value.peer == 1 and 0.3 <= time.monotonic() - t < 1.5 and "deadline" in str(e.value)
    abort = threading.Event()
    threading.Timer(0.1, abort.set).start()
    with pytest.raises(Aborted):
        poll_works([(late, 1)], abort=abort, deadline_s=30.0)


def test_an_abort_past_its_deadline_calls_on_hang_and_a_prompt_one_does_not():
    hung = []
    call_with_deadline(lambda: time.sleep(3), 0.2, "slow abort", on_hang=hung.append)
    quick = call_with_deadline(lambda: None, 0.2, "quick abort", on_hang=hung.append)
    quick.join(1)
    time.sleep(0.5)
    assert hung == ["slow abort"]


def test_a_process_whose_abort_hangs_exits():
    code = ("import time; from kintsugi.parallel.waiter import call_with_deadline; "
            "call_with_deadline(lambda: time.sleep(60), 0.3, 'abort of a test communicator'); time.sleep(60)")
    import os
    env = dict(os.environ)
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == EXIT_ABORT_HUNG, proc.stderr[-2000:]
    assert time.monotonic() - t < 20
    assert "abort of a test communicator did not return within its deadline" in proc.stderr


def test_a_per_thread_waiter_ends_with_its_thread(pair, monkeypatch):
    monkeypatch.setattr(waiter_mod, "OWNER_POLL_S", 0.1)

    def waiters():
        return [t for t in threading.enumerate() if t.name == "kintsugi-wait"]
    before = len(waiters())

    def short_lived():  # e.g. a rebuild thread of one generation
        work = pair[0].irecv(torch.zeros(2), 1, 11)
        send = pair[1].isend(torch.ones(2), 0, 11)
        wait_abortable(work, threading.Event(), peer=1)
        send.wait()
    t = threading.Thread(target=short_lived)
    t.start()
    t.join(10)
    assert len(waiters()) == before + 1  # it got its own long-lived waiter...
    deadline = time.monotonic() + 5
    while len(waiters()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(waiters()) == before  # ...which ended after the thread did


def test_collectives_on_a_pollable_group_are_polled_under_its_deadline(pair):
    """compression.all_reduce on an NCCL group polls `is_completed()` (NCCL's wait() does not block
    the host); gloo's collectives poll the same way, so the path runs here on real gloo works."""
    from kintsugi.compression.api import all_reduce
    for g in pair.values():
        g.pollable, g.deadline_s = True, 0.5  # as an NcclGroup is
    a, b = torch.ones(300), torch.full((300,), 3.0)
    other = threading.Thread(target=lambda: all_reduce([b], "none", group=pair[1]))
    other.start()
    all_reduce([a], "none", group=pair[0])
    other.join(10)
    assert torch.equal(a, b) and float(a[0]) == 2.0  # the average of 1 and 3
    alone = torch.ones(300)
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="deadline"):
        all_reduce([alone], "none", group=pair[0])  # rank 1 never joins
    assert 0.5 <= time.monotonic() - t < 3.0


def test_a_failed_nccl_group_is_never_reused_and_aborts_off_the_callers_thread(pair):
    """NcclGroup's bookkeeping around a real back-end (gloo here: NCCL needs GPUs, see
    tests/gpu/test_device_gpu.py for the real communicator): fail() returns at once, the abort runs
    on its own thread, and every later call is refused."""
    from kintsugi.parallel.groups import NcclGroup
    g = NcclGroup(pair[0].pg, 0, 2, "stand-in", abort_deadline_s=5.0)
    pair[0].closed = True  # the back-end now belongs to g
    t = time.monotonic()
    g.fail(RuntimeError("rank 1 missed its deadline"))
    assert time.monotonic() - t < 0.1
    g.abort_thread.join(5)
    assert not g.abort_thread.is_alive()
    for call in (lambda: g.isend(torch.zeros(1), 1, 0), lambda: g.irecv(torch.zeros(1), 1, 0),
                 lambda: g.all_reduce(torch.zeros(1)), lambda: g.broadcast(torch.zeros(1), 0)):
        with pytest.raises(RuntimeError, match="never reused"):
            call()
