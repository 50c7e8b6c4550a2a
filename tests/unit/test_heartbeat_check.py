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
