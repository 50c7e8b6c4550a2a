"""A worker's membership, its side: joining with the token, the coordinator's answer, and
re-registering with a restarted coordinator (then replaying the commits it may have missed).

The join record proves the token by its seal; the token itself never leaves the worker. An answer
that does not verify is a refusal (a coordinator that could not verify our token cannot seal for us
either) once no verified one came for a few seconds: someone else may have written it.
"""
from __future__ import annotations

import logging
import os
import socket
import time

from kintsugi.recovery import control as C

log = logging.getLogger("kintsugi.worker")


UNVERIFIED = "refused: its answer does not verify with this token"


def await_ack(c: C.Control, wid: str, timeout_s: float, unverified_s: float = 5.0) -> str:
    deadline, unverified_since = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        if c.check(f"ack/{wid}"):
            ack = c.get_json_or(f"ack/{wid}")
            if ack is not None:
                return ack
            unverified_since = unverified_since or time.monotonic()
            if time.monotonic() - unverified_since > unverified_s:
                return UNVERIFIED
        time.sleep(0.05)
    return "no answer"


def join(c: C.Control, wid: str, machine: str, timeout_s: float = 120.0) -> None:
    """Join the run: the join record, then the coordinator's answer. A coordinator that goes away
    meanwhile (killed, restarted in place, a standby taking the lead from one whose etcd lease ran
    out) took the record with its store, or never answered: join its successor instead, within
    `timeout_s` in all. (The watcher, which reconnects a running worker, does not run yet.)"""
    deadline = time.monotonic() + timeout_s
    rec = {"wid": wid, "pid": os.getpid(), "host": socket.gethostname(), "machine": machine}
    while True:
        try:
            c.append("join", rec)
            ack = await_ack(c, wid, max(0.1, deadline - time.monotonic()))
            break
        except C.CoordinatorAway as e:
            log.warning("the coordinator went away while this worker joined (%s); joining its successor",
                        str(e).splitlines()[0][:120] if str(e) else "away")
            while not c.reconnect():
                if time.monotonic() > deadline:
                    raise SystemExit(f"kintsugi: the coordinator went away while worker {wid} joined and none "
                                     f"answered within {timeout_s:.0f}s; start it again, then this worker") from None
                time.sleep(0.1)
    if ack == UNVERIFIED:
        raise SystemExit(f"kintsugi: the coordinator refused this worker ({ack}); set KINTSUGI_TOKEN to the "
                         "run's token")
    if ack != "ok":
        raise SystemExit(f"kintsugi: the coordinator did not take worker {wid} ({ack})")


def rejoin(w) -> None:
    """The coordinator came back (a new incarnation): re-register, then replay the commits it may
    not have recorded (it keeps the first record of each step). `w`: the worker."""
    c, st = w.bg, w.state
    rec = {"wid": w.wid, "pid": os.getpid(), "host": socket.gethostname(),
           "machine": w.machine, "slot": list(w.slot) if w.slot else None,
           "cell": w.watcher.working_cell, "cell_gen": w.watcher.working_gen,
           "step_done": st.step_done if st is not None else None}
    newest = w.commit.newest(w.slot[0]) if w.slot is not None else None
    if newest is not None:  # the coordinator plans this cell only once it recorded this far
        rec["committed"] = [w.slot[0], newest]
    deadline = time.monotonic() + 30.0
    while True:
        c.append("rejoin", rec)
        ack = await_ack(c, w.wid, max(0.1, deadline - time.monotonic()), unverified_s=1.0)
        # This coordinator just proved its identity to us, so an answer that does not verify was
        # written by someone else (an old incarnation's answer written back): ask again.
        if ack != UNVERIFIED or time.monotonic() >= deadline:
            break
    if ack not in ("ok", "no answer"):
        log.warning("the restarted coordinator does not count this worker as a member; stopping")
        w.watcher.shutdown.set()
        w.watcher.stop.set()
        w.watcher.cell_abort.set()
        return
    if w.slot is not None:
        w.commit.replay_after_restart(c, w.slot[0])
