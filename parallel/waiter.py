"""Waiting for torch.distributed work: abortable, without a thread per wait, and under deadlines.

Two kinds of work handle need two strategies:

- gloo point-to-point works cannot be polled (`is_completed()` stays False until `wait()` returns)
  and a wait on a SIGSTOPped peer blocks until the group's timeout; nothing unblocks it from another
  thread. So a wait the caller may have to abandon runs off the caller's thread. A `Waiter` is one
  long-lived thread that calls `wait()` for its owner, one request at a time; the caller watches its
  abort event meanwhile. A thread per wait instead pays a thread start (and its scheduling on a
  loaded machine) on every wait: BENCHMARKS.md, "Pipeline throughput", for what removing it saved.
- NCCL works (and gloo collectives) can be polled: `poll_works` checks them on the caller's thread,
  each under its own deadline, with no thread at all. A killed NCCL peer never makes a receive raise,
  so the deadline is what turns a dead peer into a `PeerFailure`.

Abandoning: when the caller gives up on a request (its abort fired), the waiter's thread stays
blocked in that `wait()` until the group is closed under it. The waiter is then spent: its
`WaiterSlot` hands out a fresh one for the next request, so an abandoned wait never delays a later
one, and the spent thread exits once its wait returns.

`call_with_deadline(fn, deadline_s, on_hang)` runs `fn` on a helper thread and calls `on_hang` if it
has not returned in time (default: log and `os._exit`): an NCCL abort that itself hangs (seen with
some NCCL versions) leaves the process unusable, and only a fresh process can take the slot again.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Callable, List, Optional, Sequence, Tuple

from .errors import Aborted

__all__ = ["PeerFailure", "Waiter", "WaiterSlot", "poll_works", "call_with_deadline", "set_idle_hook",
           "run_idle", "EXIT_ABORT_HUNG"]

log = logging.getLogger(__name__)
POLL_S = 0.05          # how often a blocked caller looks at its abort event and runs the idle hook
EXIT_ABORT_HUNG = 70   # exit status of a process whose communicator abort did not return (EX_SOFTWARE)
OWNER_POLL_S = 30.0    # how often an idle per-thread waiter checks that its owner thread still runs


class PeerFailure(RuntimeError):
    """Communication with a peer raised or missed its deadline: the peer is suspect (killed, crashed,
    hung or partitioned)."""

    def __init__(self, peer: int, cause: BaseException):
        super().__init__(f"communication with rank {peer} failed: {cause}")
        self.peer = peer


_IDLE: List[Callable[[], None]] = []


def set_idle_hook(fn: Optional[Callable[[], None]]) -> None:
    """`fn()` runs on the main thread, about every 50 ms, while it waits for communication (a worker
    serves peer snapshots there: its state is consistent while it waits)."""
    _IDLE[:] = [fn] if fn is not None else []


def run_idle() -> None:
    if _IDLE and threading.current_thread() is threading.main_thread():
        try:
            _IDLE[0]()
        except Exception:  # noqa: BLE001 - a failing hook must not break the wait it runs in
            log.exception("idle hook failed")


Request = Sequence[Tuple[object, int]]  # (work handle, peer rank) pairs, waited for in order


class Waiter:
    """One long-lived thread that waits for work handles on behalf of one owner."""

    def __init__(self, name: str = "kintsugi-waiter", owner: Optional[threading.Thread] = None):
        """`owner`: a thread whose end also ends this waiter (a per-thread waiter outlives no caller)."""
        self._owner = owner
        self._requests: "queue.SimpleQueue" = queue.SimpleQueue()
        self._done = threading.Event()
        self._error: Optional[Tuple[int, BaseException]] = None
        self.spent = False  # a request was abandoned: the thread may be blocked for good
        self._thread = threading.Thread(target=self._loop, daemon=True, name=name)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                request = self._requests.get(timeout=None if self._owner is None else OWNER_POLL_S)
            except queue.Empty:
                if self._owner.is_alive():
                    continue
                return
            if request is None:
                return
            for work, peer in request:
                try:
                    work.wait()
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                    self._error = (peer, e)
                    break
            request = work = None  # the works hold their buffers: release them now, not at the next request
            self._done.set()
            if self.spent:  # the owner moved on while we were blocked: nobody will ask again
                return

    def wait(self, request: Request, abort) -> None:
        """Wait for every work in `request` (in order); `Aborted` if `abort` (anything with
        `is_set()`) fires first, `PeerFailure` naming the peer of the first work that raised."""
        if self.spent:
            raise RuntimeError("this waiter abandoned a wait; take a fresh one from its WaiterSlot")
        if abort.is_set():
            raise Aborted()
        self._done.clear()
        self._error = None
        self._requests.put(list(request))
        while not self._done.wait(POLL_S):
            if abort.is_set():
                self.spent = True
                self._requests.put(None)  # ends the thread once the abandoned wait returns
                raise Aborted()
            run_idle()
        if self._error is not None:
            peer, err = self._error
            self._error = None
            raise PeerFailure(peer, err) from err

    def close(self) -> None:
        if not self.spent:
            self.spent = True
            self._requests.put(None)


class WaiterSlot:
    """The owner's current waiter; a spent one is replaced on the next `get()`."""

    def __init__(self, name: str = "kintsugi-waiter", owner: Optional[threading.Thread] = None):
        self.name, self.owner = name, owner
        self._waiter: Optional[Waiter] = None
        self.started = 0  # threads started over this slot's life (tests: one per abandonment)

    def get(self) -> Waiter:
        if self._waiter is None or self._waiter.spent:
            self._waiter = Waiter(self.name, self.owner)
            self.started += 1
        return self._waiter

    def close(self) -> None:
        if self._waiter is not None:
            self._waiter.close()


def wait_inline(request: Request) -> None:
    """Wait on the caller's thread (no abort to watch): errors become `PeerFailure`."""
    for work, peer in request:
        try:
            work.wait()
        except RuntimeError as e:
            raise PeerFailure(peer, e) from e


def poll_works(request: Sequence[tuple], abort=None, deadline_s: Optional[float] = None,
               poll_s: float = 0.0005) -> None:
    """Wait for works whose completion can be polled (`is_completed()`: NCCL works, gloo
    collectives) on the caller's thread; `request` holds (work, peer) or (work, peer, posted at,
    monotonic) entries. `Aborted` when `abort` fires first; `PeerFailure` when one raised
    (`exception()` set) or is still pending `deadline_s` after it was posted (default: now). Each
    poll is cheap: a CUDA event query per pending work."""
    now = time.monotonic()
    pending = [(e[0], e[1], e[2] if len(e) > 2 else now) for e in request]
    next_idle = now + POLL_S
    while pending:
        still = []
        for work, peer, posted in pending:
            if work.is_completed():
                err = _exception(work)
                if err is not None:
                    raise PeerFailure(peer, err)
            else:
                still.append((work, peer, posted))
        pending = still
        if not pending:
            return
        now = time.monotonic()
        if abort is not None and abort.is_set():
            raise Aborted()
        late = [(peer, now - posted) for _w, peer, posted in pending
                if deadline_s is not None and now - posted > deadline_s]
        if late:
            raise PeerFailure(late[0][0], TimeoutError(f"no completion {late[0][1]:.1f} s after it was posted "
                                                       f"(deadline {deadline_s:.1f} s)"))
        if now >= next_idle:
            run_idle()
            next_idle = now + POLL_S
        time.sleep(poll_s)


def _exception(work) -> Optional[BaseException]:
    try:
        return work.exception()
    except Exception:  # noqa: BLE001 - some work types do not implement exception(): none known
        return None


def _exit_hung(what: str) -> None:
    log.critical("%s did not return within its deadline: this process exits (status %d) so that a "
                 "fresh one can take its place", what, EXIT_ABORT_HUNG)
    logging.shutdown()
    os._exit(EXIT_ABORT_HUNG)


def call_with_deadline(fn: Callable[[], None], deadline_s: float, what: str,
                       on_hang: Optional[Callable[[str], None]] = None) -> threading.Thread:
    """Run `fn()` on a helper thread; if it has not returned after `deadline_s`, call
    `on_hang(what)` (default: exit the process). Returns at once with the helper thread (join it
    to wait). Errors from `fn` are logged, not raised: an abort is best effort."""
    on_hang = on_hang or _exit_hung
    done = threading.Event()

    def _run():
        try:
            fn()
        except Exception:  # noqa: BLE001 - a failed abort still leaves the communicator unusable
            log.exception("%s raised", what)
        finally:
            done.set()

    def _watch():
        if not done.wait(deadline_s):
            on_hang(what)

    worker = threading.Thread(target=_run, daemon=True, name="kintsugi-abort")
    worker.start()
    threading.Thread(target=_watch, daemon=True, name="kintsugi-abort-deadline").start()
    return worker
