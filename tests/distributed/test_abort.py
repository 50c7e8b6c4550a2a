"""The abort path against a work handle that never completes: a real gloo receive whose sender
never sends (a peer SIGSTOPped or moved on). The generation changes: the wait returns within its
deadline, the group closes without blocking, and the reaper releases its connections."""
import os
import socket
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from kintsugi.parallel.groups import Aborted, form_group
from kintsugi.parallel.transport import wait_abortable

pytestmark = pytest.mark.distributed


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_receive_that_never_completes_is_abandoned_within_its_deadline():
    port = _port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, use_libuv=True)

    def connect():
        return dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False, use_libuv=True,
                             timeout=timedelta(seconds=30))

    groups = {}

    def form(rank):
        groups[rank] = form_group(connect, "gen/7", rank, 2, timeout_s=60.0)

    threads = [threading.Thread(target=form, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    fds_formed = len(os.listdir("/proc/self/fd"))
    work = groups[1].irecv(torch.zeros(4), 0, 5)  # rank 0 never sends: it waits 60 s on gloo's own
    abort = threading.Event()
    threading.Timer(0.3, abort.set).start()       # the next generation is published
    t0 = time.monotonic()
    with pytest.raises(Aborted):
        wait_abortable(work, abort, peer=0)
    waited = time.monotonic() - t0
    assert 0.25 <= waited < 0.3 + 0.5, waited     # the abort, not gloo's 60 s timeout
    t0 = time.monotonic()
    for g in groups.values():
        g.close()
    assert time.monotonic() - t0 < 0.1, "close must hand off, never block on the dead receive"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(os.listdir("/proc/self/fd")) >= fds_formed:
        time.sleep(0.05)
    assert len(os.listdir("/proc/self/fd")) < fds_formed, "the abandoned group's connections stayed open"
    del master
