"""The coordinator's heartbeat check against a real TCPStore (in this process): a worker's
beat key that is missing never stalls it, and a missing beat is no beat.

A key is missing when a worker joined and its placeholder waits for the state save (write-ahead,
recovery.control=etcd), or when someone without the token deleted it. TCPStore's multi_get waits
for a missing key as long as the store's timeout (the coordinator's is minutes), so reading every
key at once froze the coordinator's loop that long whenever a spare joined mid-run under etcd."""
import time
from datetime import timedelta

import torch.distributed as dist

from kintsugi.recovery import protocol as P
from kintsugi.recovery.auth import Auth
from kintsugi.recovery.board import Board
from kintsugi.recovery.control_state import CoordinatorState, Settings
from kintsugi.recovery.membership import Membership

TIMEOUT_S = 0.3


def _membership(write_ahead):
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False,
                          use_libuv=True)
    job = {"parallel": {"replicas": 1, "stages": 2}, "train": {"max_steps": 20},
           "recovery": {"strategy": "tiered", "heartbeat_interval_s": 0.05, "heartbeat_timeout_s": TIMEOUT_S,
                        "init_timeout_s": 30.0},
           "diloco": {"enabled": False}, "faults": {"spares": 1}, "model": {"n_layers": 4}}
    settings = Settings.from_job(job)
    st = CoordinatorState.fresh(settings, port=store.port, layout=[2, 2])
    board = Board(store, Auth("t0ken-for-the-test", "run-1", "boot-1", writer="coordinator"))
    if write_ahead:
        board.hold_writes()
    return Membership(st, settings, board, lambda: None, lambda: None), st, board, store


def test_a_missing_beat_never_stalls_the_check_and_counts_as_none():
    # A joiner whose placeholder beat waits for the save (etcd's write-ahead).
    m, st, board, store = _membership(write_ahead=True)
    m.on_join({"wid": "w5", "pid": 1, "host": "h"})
    assert board.holding and not store.check([P.beat_key(board.auth, "w5")]), "the test needs the placeholder held"
    started = time.monotonic()
    m.check_heartbeats()
    assert time.monotonic() - started < 5.0, "the heartbeat check waited for a key that was not there"
    assert st.workers["w5"].state == "spare"
    board.release()   # the save came: its placeholder, then its own beats
    m.check_heartbeats()
    assert st.workers["w5"].state == "spare"

    # A beat deleted by someone without the token (or a worker that died): no stall, and no beat.
    m, st, board, store = _membership(write_ahead=False)
    m.on_join({"wid": "w1", "pid": 1, "host": "h"})
    m.on_join({"wid": "w2", "pid": 2, "host": "h"})
    n = 0
    deadline = time.monotonic() + 3 * TIMEOUT_S + 1.0
    while time.monotonic() < deadline and st.workers["w1"].state == "spare":
        n += 1
        board.put(P.beat_key(board.auth, "w2"), {"n": n})   # w2 beats on time (as w2 would seal it)
        store.delete_key(P.beat_key(board.auth, "w1"))      # w1's beat is deleted as soon as it appears, or it died
        started = time.monotonic()
        m.check_heartbeats()
        assert time.monotonic() - started < 5.0, "the heartbeat check waited for a deleted key"
        time.sleep(0.06)
    assert st.workers["w1"].state == "dead", "a worker whose beat is missing was kept alive"
    assert st.workers["w2"].state == "spare"


def test_a_new_incarnation_plans_a_cell_only_after_its_members_replayed():
    """After a restart or a change of leader the committed steps come from what the earlier
    incarnation recorded, and the ones it missed arrive as the members' replays after they
    re-register. A rebuild planned before them resumes too early: the cell trains committed steps
    again (seen once in tests/etcd/test_partition_training.py as a step recorded `duplicate`)."""
    m, st, board, store = _membership(write_ahead=False)
    for i, slot in enumerate([(0, 0), (0, 1)]):
        m.on_join({"wid": f"w{i}", "pid": i + 1, "host": "h"})
        m.assign(slot, st.workers[f"w{i}"])
    st.committed[0] = 4                      # what the earlier incarnation recorded
    cell = st.cell_of(0)
    assert m.caught_up(cell), "a coordinator that did not restore anything plans at once"

    m.restored()
    assert not m.caught_up(cell), "planned before any member re-registered"
    m.on_rejoin({"wid": "w0", "slot": [0, 0], "step_done": 7, "committed": [0, 7]})
    assert not m.caught_up(cell), "planned while w1 had not re-registered"
    m.declare_dead("w1", "killed as the new leader took over")
    assert not m.caught_up(cell), "planned before w0's replay of steps 5..7 arrived"
    st.committed[0] = 7                      # the replay was recorded (ledger.accept)
    assert m.caught_up(cell)

    # A member that never re-registers (its link to the new leader is down) holds the plan back at
    # most 3 x heartbeat_timeout_s, 5 s at least.
    m, st, board, store = _membership(write_ahead=False)
    m.on_join({"wid": "w0", "pid": 1, "host": "h"})
    m.assign((0, 0), st.workers["w0"])
    m.restored()
    assert not m.caught_up(st.cell_of(0))
    m._restored_at -= 5.1
    assert m.caught_up(st.cell_of(0))


def test_a_commit_is_a_sign_of_life_only_once_the_beat_was_overdue():
    """Worked by hand, beats every 0.05 s (the usual interval; 2 x 0.05 = 0.10 s is overdue),
    the last one at t = 100.00 and a timeout of 0.3 s.
    - The cell commits at 100.04 and the worker hangs: the commit came while the beat was on time,
      so silence counts from 100.00 and the worker is silent past its bound at 100.30, not 100.34.
    - The heartbeat thread starves while the cell keeps committing (100.25, then 100.55): those
      commits came with the beat overdue, so the worker was alive at 100.55 and is not silent
      past its bound until 100.85."""
    import collections

    from kintsugi.recovery.plan import CellPlan
    m, st, board, store = _membership(write_ahead=False)
    for i, slot in enumerate([(0, 0), (0, 1)]):
        m.on_join({"wid": f"w{i}", "pid": i + 1, "host": "h"})
        m.assign(slot, st.workers[f"w{i}"])
    cell = st.cell_of(0)
    cell.plan = CellPlan(cell=0, gen=1, replicas=(0,), slots={(0, 0): "w0", (0, 1): "w1"}, ranks={"w0": 0, "w1": 1})
    w = st.workers["w0"]
    assert w.state == "active"
    w.hb_changed = 100.0
    m._intervals["w0"] = collections.deque([0.05] * 8)

    cell.committed_at = 100.04
    assert m.last_sign_of_life(w) == 100.0, "a commit while the beats were on time moved the silence's start"
    assert m.silence_bound(w) == TIMEOUT_S
    for cell.committed_at, alive_at in ((100.25, 100.25), (100.55, 100.55)):
        assert m.last_sign_of_life(w) == alive_at, "a commit with the beat overdue is no sign of life"
    # A worker whose beats usually come 0.2 s apart: 0.25 s after its beat is not overdue yet.
    m._intervals["w0"] = collections.deque([0.2] * 8)
    cell.committed_at = 100.25
    assert m.last_sign_of_life(w) == 100.0


def test_a_join_asked_again_by_the_same_process_is_answered_again():
    """A restored incarnation knows a worker whose answer went down with the old store: the same
    process (pid and host) asking again gets its answer; another process with that id does not."""
    m, st, board, store = _membership(write_ahead=False)
    m.on_join({"wid": "w5", "pid": 41, "host": "h"})
    assert board.get("ack/w5") == "ok"
    store.delete_key("ack/w5")            # the old incarnation's store, gone with its answer
    m.on_join({"wid": "w5", "pid": 99, "host": "h"})
    assert not store.check(["ack/w5"]), "another process took over a known worker id"
    m.on_join({"wid": "w5", "pid": 41, "host": "h"})
    assert board.get("ack/w5") == "ok", "the same process asking again got no answer"
    m.declare_dead("w5", "test")
    store.delete_key("ack/w5")
    m.on_join({"wid": "w5", "pid": 41, "host": "h"})
    assert not store.check(["ack/w5"]), "a worker declared dead was let back in by a join"
