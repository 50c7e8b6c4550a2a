"""Stage groups with generations of their own (parallel.stage_link) under Streaming DiLoCo, with three
real replica processes and hand-written stage plans standing in for the coordinator:

- gen 0, all three sync: the global copies are bitwise equal everywhere;
- gen 1 drops replica 2 (it "died"): replicas 0 and 1 keep syncing between themselves, replica 2
  starts nothing (it is not a member) and falls behind;
- gen 2 takes replica 2 back with its stale state: the handshake sees different sync counts, the
  member with the most syncs broadcasts, and all three hold bitwise-equal global copies and counts
  again; a member marked `needs_state` (an approximately rebuilt stage) also resets its local
  parameters to the global ones;
- a job whose generation is superseded while it waits for a member that never comes raises
  Aborted promptly instead of blocking until the group timeout.
The expected global copy of the two-member syncs is recomputed here by hand (mean of the two
deltas, one Nesterov step), independently of the code under test."""
import os
import pickle
import subprocess
import sys

import pytest
import torch

from testkit import ROOT

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

CHILD = r'''
import os, pickle, sys, time, threading
import torch, torch.distributed as dist
from datetime import timedelta
sys.path.insert(0, os.environ["ROOT"])
from kintsugi.parallel.diloco import StreamingDiLoCo
from kintsugi.parallel.groups import Aborted
from kintsugi.parallel.stage_link import StageGroupPlan, StageLink
from kintsugi.trainer.config.job import DilocoConfig

rank, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
connect = lambda: dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60),
                                wait_for_workers=False, use_libuv=True)
store = connect()
def plan(gen, members):
    return StageGroupPlan.from_json({"stage": 0, "gen": gen, "members": {f"w{r}": i for i, r in enumerate(members)},
                                     "layout_version": 0, "trusted": gen == 0})
def settle():  # what a worker does between steps while a stage generation opens (its handshake)
    deadline = time.monotonic() + 60
    while link.member() and not (link.settled(link.gen) and link.pending_resync is None):
        d.serve_idle()
        assert time.monotonic() < deadline, "the stage generation never settled"
        time.sleep(0.01)
def barrier(name):
    store.add(name, 1)
    while int(store.add(name, 0)) < 3:
        time.sleep(0.01)
torch.manual_seed(0)
params = {"w": torch.nn.Parameter(torch.randn(64)), "layers.0.v": torch.nn.Parameter(torch.randn(8, 8))}
cfg = DilocoConfig(enabled=True, sync_every=2, fragments=1, overlap=0, alpha=0.0, outer_lr=0.7, outer_momentum=0.9)
link = StageLink(connect, 0, f"w{rank}", timeout_s=60)
d = StreamingDiLoCo(params, cfg, link)
def inner(t):  # a deterministic, replica-specific inner step
    with torch.no_grad():
        for i, p in enumerate(params.values()):
            p.add_(0.01 * (rank + 1) * (i + 1) * torch.ones_like(p) + 0.001 * t)
res = {"snap": {}}
def snap(tag):
    res["snap"][tag] = {"global": {n: g.clone() for n, g in d.global_params().items()},
                        "local": {n: p.detach().clone() for n, p in params.items()},
                        "syncs": [f.syncs for f in d.fragments], "needs_state": d.needs_state}
link.update(plan(0, [0, 1, 2]))
for t in (1, 2):
    inner(t); d.after_inner_step(t)
snap("gen0")
barrier("b0")
if rank < 2:
    link.update(plan(1, [0, 1]))
    settle()
    for t in (3, 4):
        pre = {n: g.clone() for n, g in d.global_params().items()}
        loc = {n: p.detach().clone() for n, p in params.items()}
        inner(t)
        if t == 4:
            res["before_gen1_sync"] = (pre, {n: p.detach().clone() for n, p in params.items()},
                                       {n: d.fragments[0].opt.state[g]["momentum_buffer"].clone()
                                        for n, g in zip(d.fragments[0].names, d.fragments[0].glob)})
        d.after_inner_step(t)
    snap("gen1")
else:
    link.update(plan(1, [0, 1]))
    for t in (3, 4):
        inner(t); d.after_inner_step(t)   # not a member: starts nothing
    snap("gen1")
    d.needs_state = True   # as an approximately rebuilt stage would be
barrier("b1")
link.update(plan(2, [0, 1, 2]))
settle()
for t in (5, 6):
    inner(t); d.after_inner_step(t)
d.finish_all()
snap("gen2")
barrier("b2")
# A superseded generation: gen 3 waits for w1 which never submits; gen 4 arrives; the wait aborts.
if rank == 0:
    link.update(plan(3, [0, 1]))
    h = link.submit(lambda g, stale: None, hello=d._hello(), state_fn=d._resync_source)
    threading.Timer(1.0, lambda: link.update(plan(4, [0]))).start()
    t0 = time.monotonic()
    try:
        link.wait(h)
        res["abort"] = None
    except Aborted:
        res["abort"] = time.monotonic() - t0
barrier("b3")
with open(out, "wb") as f:
    pickle.dump(res, f)
'''


def test_stage_generations_drop_and_readmit_a_replica(tmp_path):
    import torch.distributed as dist
    from datetime import timedelta

    from kintsugi.recovery.protocol import free_port
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=60), wait_for_workers=False,
                          use_libuv=True)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, ROOT=ROOT, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(port), str(tmp_path / f"r{r}.pkl")], env=env,
                              stderr=subprocess.PIPE, text=True) for r in range(3)]
    try:
        for p in procs:
            _, err = p.communicate(timeout=150)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    del store
    res = [pickle.loads((tmp_path / f"r{r}.pkl").read_bytes()) for r in range(3)]

    def equal(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # gen 0: one sync among all three, bitwise-equal global copies.
    assert all(equal(res[0]["snap"]["gen0"]["global"], r["snap"]["gen0"]["global"]) for r in res)
    assert [r["snap"]["gen0"]["syncs"] for r in res] == [[1]] * 3
    # gen 1: replicas 0 and 1 synced once more between themselves; replica 2 did not.
    assert res[0]["snap"]["gen1"]["syncs"] == res[1]["snap"]["gen1"]["syncs"] == [2]
    assert res[2]["snap"]["gen1"]["syncs"] == [1]
    assert equal(res[0]["snap"]["gen1"]["global"], res[1]["snap"]["gen1"]["global"])
    # ... and that sync is the two-member average, worked by hand: delta = global - local,
    # mean over replicas 0 and 1, Nesterov SGD (lr 0.7, momentum 0.9) on the global copy.
    g0 = res[0]["before_gen1_sync"][0]
    locs = [res[q]["before_gen1_sync"][1] for q in (0, 1)]
    mom0 = res[0]["before_gen1_sync"][2]
    for n in g0:
        delta = (sum(g0[n] - loc[n] for loc in locs)) / 2
        buf = 0.9 * mom0[n] + delta
        expect = g0[n] - 0.7 * (delta + 0.9 * buf)
        assert torch.allclose(res[0]["snap"]["gen1"]["global"][n], expect, atol=1e-6), n
    # gen 2: the stale member adopted the state with the most syncs; all equal again, counts too.
    assert all(equal(res[0]["snap"]["gen2"]["global"], r["snap"]["gen2"]["global"]) for r in res)
    assert len({tuple(r["snap"]["gen2"]["syncs"]) for r in res}) == 1
    # The member that needed state adopted the group's (and with it its local parameters).
    assert res[2]["snap"]["gen2"]["needs_state"] is False
    # A superseded generation's wait aborts within a second of the newer plan, not at the timeout.
    assert res[0]["abort"] is not None and res[0]["abort"] < 3.0
