"""The maths itself, against numbers worked out by hand (in the comments), never by the code under test.

CheckFree's gradient-weighted average, CheckFree+'s end-stage rebuild and its embedding / head
copies, the Streaming DiLoCo outer Nesterov step with the alpha merge, and the fragment sync
schedule, each through the functions the trainer calls (`StageState.rebuild_from`,
`refresh_neighbour_copies`, `plan_rebuilds`, `StreamingDiLoCo.after_inner_step`). Expectations come
from the papers' rules as written in /work/shared/REFERENCE.md.
"""
import math

import pytest
import torch

from kintsugi.compression import api as compression
import kintsugi.parallel.diloco as diloco_mod
from kintsugi.parallel.diloco import StreamingDiLoCo
from kintsugi.parallel.schedules import EMBED, HEAD, LAYERS, Hop, swapped_route
from kintsugi.parallel.topology import Grid
from kintsugi.recovery.rebuild import checkfree_average
from kintsugi.recovery.tiers import plan_rebuilds
from kintsugi.trainer.config.job import DilocoConfig, JobConfig
from kintsugi.trainer.model.llama import ModelConfig
from kintsugi.trainer.runtime.rebuild import refresh_neighbour_copies
from kintsugi.trainer.runtime.stage import StageState

TOL = 1e-6


def _job(stages=4, n_layers=4):
    job = JobConfig(model=ModelConfig(dim=16, n_layers=n_layers, n_heads=2, n_kv_heads=2, vocab_size=32,
                                      max_seq_len=256))
    job.parallel.stages = stages
    return job


def _fill(st: StageState, value: float) -> StageState:
    with torch.no_grad():
        for p in st.model.parameters():
            p.fill_(value)
    return st


def _layers(sd):
    return {k: v for k, v in sd.items() if k.startswith("layers.")}


def _ends(sd):
    return {k: v for k, v in sd.items() if not k.startswith("layers.")}


def _assert_all(tensors, value):
    assert tensors
    for k, v in tensors.items():
        assert torch.allclose(v, torch.full_like(v, value), rtol=0, atol=TOL), (k, v.flatten()[:3], value)


# --- 1. CheckFree: W = (w_prev W_prev + w_next W_next) / (w_prev + w_next), w = ||g||_2 + 1e-4 ---------
def test_checkfree_average_of_literal_tensors():
    prev = {"layers.0.w": torch.tensor([1.0, -2.0]), "tok_embeddings.weight": torch.tensor([9.0])}
    nxt = {"layers.0.w": torch.tensor([4.0, 0.5])}
    out = checkfree_average(prev, nxt, 0.2001, 0.6001)
    # element 0: (0.2001 * 1 + 0.6001 * 4) / 0.8002 = (0.2001 + 2.4004) / 0.8002 = 2.6005 / 0.8002 = 3.24981254686...
    # element 1: (0.2001 * -2 + 0.6001 * 0.5) / 0.8002 = (-0.4002 + 0.30005) / 0.8002 = -0.10015 / 0.8002 = -0.12515621...
    # weights swapped would give 1.4005 / 0.8002 = 1.75019 for element 0.
    torch.testing.assert_close(out["layers.0.w"], torch.tensor([3.2498125468632842, -0.1251562109472632]),
                               rtol=0, atol=TOL)
    assert set(out) == {"layers.0.w"}  # only layer tensors both neighbours hold are averaged


def test_checkfree_rebuild_weights_by_plain_gradient_norms():
    """Stage 1 of 4 lost; stage 0 holds 1.0 everywhere with ||g|| = 0.2, stage 2 holds 4.0 with
    ||g|| = 0.6. By hand: (0.2001 * 1 + 0.6001 * 4) / 0.8002 = 3.24981254686...
    The alternatives all differ by far more than 1e-6:
      weights swapped:          (0.6001 * 1 + 0.2001 * 4) / 0.8002 = 1.75019
      squared norms:            (0.0401 * 1 + 0.3601 * 4) / 0.4002 = 3.69940
      no 1e-4:                  (0.2 * 1 + 0.6 * 4) / 0.8           = 3.25
      plain mean:                                                    2.5"""
    job = _job()
    s0, s2 = _fill(StageState(job, 0), 1.0), _fill(StageState(job, 2), 4.0)
    s0.grad_norm, s2.grad_norm = 0.2, 0.6
    before0, before2 = s0.source_package()["params"], s2.source_package()["params"]
    target = StageState(job, 1)
    target.rebuild_from("checkfree", [s0.source_package(), s2.source_package()], lr_bump=1.1, step=7)
    _assert_all(_layers(target.model.state_dict()), 3.2498125468632842)
    # Neighbours bitwise untouched; fresh optimizer; lr x 1.1 (not compounding); resumes at step 7.
    for st, before in ((s0, before0), (s2, before2)):
        assert all(torch.equal(v, before[k]) for k, v in st.source_package()["params"].items())
    assert target.optimizer.state_dict()["state"] == {}
    assert target.lr_scale == 1.1 and target.step_done == 6
    target.rebuild_from("checkfree", [s0.source_package(), s2.source_package()], lr_bump=1.1, step=9)
    assert target.lr_scale == 1.1


def test_checkfree_zero_weight_copies_exactly():
    """w = (1, 0) in the paper's formula is an exact copy (REFERENCE.md's first check)."""
    a = {"layers.0.w": torch.tensor([0.1, -7.25, 3.0])}
    b = {"layers.0.w": torch.tensor([100.0, 5.0, -1.0])}
    assert torch.equal(checkfree_average(a, b, 1.0, 0.0)["layers.0.w"], a["layers.0.w"])


def test_recorded_gradient_norm_is_plain_not_squared():
    """The weight a stage exports is its gradient norm: grads 0.3 and 0.4 give sqrt(0.09 + 0.16) = 0.5
    (squared would be 0.25). Pipeline norm sqrt(0.64) = 0.8 < clip 1.0, so nothing is clipped."""
    st = StageState(_job(), 1)
    params = list(st.model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    params[0].grad.view(-1)[0], params[0].grad.view(-1)[1] = 0.3, 0.4
    st.apply_step(0, total_sq=0.64, local_sq=st.local_grad_sq())
    assert math.isclose(st.grad_norm, 0.5, rel_tol=0, abs_tol=TOL)
    assert st.source_package()["grad_norm"] == st.grad_norm


def test_an_infinite_gradient_norm_counts_as_zero_weight():
    """(test_nonfinite_rebuild covers a NaN norm on the previous stage; this is +inf, on either side.)
    w = (0 + 1e-4, 0.6 + 1e-4): (0.0001 * 1 + 0.6001 * 4) / 0.6002 = 2.4005 / 0.6002 = 3.99950016661...
    mirrored, w = (0.2001, 0.0001): (0.2001 * 1 + 0.0001 * 4) / 0.2002 = 0.2005 / 0.2002 = 1.00149850149..."""
    job = _job()
    s0, s2 = _fill(StageState(job, 0), 1.0), _fill(StageState(job, 2), 4.0)
    target = StageState(job, 1)
    s0.grad_norm, s2.grad_norm = float("inf"), 0.6
    target.rebuild_from("checkfree", [s0.source_package(), s2.source_package()], lr_bump=1.1, step=3)
    _assert_all(_layers(target.model.state_dict()), 3.99950016661113)
    s0.grad_norm, s2.grad_norm = 0.2, float("-inf")
    target.rebuild_from("checkfree", [s0.source_package(), s2.source_package()], lr_bump=1.1, step=3)
    _assert_all(_layers(target.model.state_dict()), 1.0014985014985015)


def test_a_single_nan_in_the_next_neighbour_copies_the_previous_one_exactly():
    """(test_nonfinite_rebuild covers a previous neighbour that is NaN everywhere.) One NaN in one
    tensor of the next stage is enough to leave it out: the result is stage 0's weights, bitwise,
    whatever the norms say."""
    job = _job()
    s0, s2 = _fill(StageState(job, 0), 1.5), _fill(StageState(job, 2), 4.0)
    s0.grad_norm, s2.grad_norm = 0.01, 0.99
    with torch.no_grad():
        next(iter(s2.model.parameters())).view(-1)[3] = float("nan")
    target = StageState(job, 1)
    target.rebuild_from("checkfree", [s0.source_package(), s2.source_package()], lr_bump=1.1, step=3)
    layers = _layers(target.model.state_dict())
    assert layers and all(torch.equal(v, torch.full_like(v, 1.5)) for v in layers.values())


# --- 2. CheckFree+: end stages copy their swap partner; embedding / head from the neighbour's copy ---
@pytest.mark.parametrize("S,lost,source", [
    (2, 0, 1), (2, 1, 0),
    (3, 0, 1), (3, 2, 1),          # 3 stages: the last has no swap partner; its neighbour is all there is
    (4, 0, 1), (4, 3, 2),
    (6, 0, 1), (6, 5, 4),
])
def test_checkfree_plus_end_stage_source(S, lost, source):
    plans = plan_rebuilds([(0, lost)], num_replicas=1, num_stages=S, strategy="checkfree_plus")
    assert plans[(0, lost)].tier == "checkfree_plus"
    assert plans[(0, lost)].sources == [(0, source)]


def test_checkfree_plus_middle_stage_averages_both_neighbours():
    plans = plan_rebuilds([(0, 2)], num_replicas=1, num_stages=6, strategy="checkfree_plus")
    assert plans[(0, 2)].tier == "checkfree" and plans[(0, 2)].sources == [(0, 1), (0, 3)]


@pytest.mark.parametrize("S,order", [
    # The paper, 1-based: E, S2, S1, S3, ..., S_n, S_{n-1}, E^-1; here 0-based.
    (4, [1, 0, 3, 2]),
    (6, [1, 0, 2, 3, 5, 4]),
])
def test_swapped_route_literal(S, order):
    route = swapped_route(S)
    assert route[0] == Hop(0, (EMBED,)) and route[-1] == Hop(S - 1, (HEAD,))
    assert [h.stage for h in route[1:-1]] == order and all(h.parts == (LAYERS,) for h in route[1:-1])


class _Loopback:
    """Stands in for the transport between two stages of one process: what is sent under a tag is
    received under the same tag."""

    def __init__(self):
        self.box = {}

    def send(self, tensor, dst, tag, channel="p2p"):
        self.box.setdefault(tag, []).append(tensor.clone())

    def recv(self, shape, src, tag, channel="p2p", dtype=torch.float32):
        t = self.box[tag].pop(0)
        assert tuple(t.shape) == tuple(shape) and t.dtype == dtype
        return t

    def flush(self):
        pass


def _refresh(job, states, step):
    """refresh_neighbour_copies as the pipeline runs it (every recovery.embedding_copy_every steps):
    senders first (stage 0, stage S-1), then receivers."""
    S, net, grid = len(states), _Loopback(), Grid(1, len(states))
    if step % job.recovery.embedding_copy_every:
        return
    for s in (0, S - 1, *range(1, S - 1)):
        refresh_neighbour_copies(states[s], grid, net, (0, s), S)
    assert all(not v for v in net.box.values())  # every copy sent was received


def test_checkfree_plus_first_stage_rebuilt_from_stage_1_and_its_embedding_copy():
    job = _job(stages=4)
    job.recovery.embedding_copy_every = 10
    states = [_fill(StageState(job, s, seed_offset=s), float(s + 1)) for s in range(4)]
    _refresh(job, states, step=10)
    # After the step-10 refresh stage 1 holds stage 0's embedding (2.0 is stage 1's own value, 1.0 stage 0's).
    assert set(states[1].neighbour_copy) == {"tok_embeddings.weight"}
    _assert_all(states[1].neighbour_copy, 1.0)
    _assert_all(states[2].neighbour_copy, 4.0)            # stage S-2 holds the last stage's norm + head
    assert set(states[2].neighbour_copy) == {"norm.weight", "output.weight"}
    # Training goes on; step 11 is not a refresh step, so the copy stays as of step 10.
    _fill(states[0], 1.25)
    _refresh(job, states, step=11)
    _assert_all(states[1].neighbour_copy, 1.0)
    source_before = states[1].source_package()["params"]
    lost = _fill(StageState(job, 0, seed_offset=99), -3.0)
    lost.rebuild_from("checkfree_plus", [states[1].source_package()], lr_bump=1.1, step=12)
    sd = lost.model.state_dict()
    _assert_all(_layers(sd), 2.0)                          # stage 1's layers (the swap partner)
    _assert_all(_ends(sd), 1.0)                            # the embedding as of the last copy, exactly
    assert set(_ends(sd)) == {"tok_embeddings.weight"}
    assert all(torch.equal(v, source_before[k]) for k, v in states[1].source_package()["params"].items())
    assert lost.optimizer.state_dict()["state"] == {} and lost.lr_scale == 1.1 and lost.step_done == 11


def test_checkfree_plus_last_stage_rebuilt_from_second_to_last_and_its_head_copy():
    job = _job(stages=4)
    job.recovery.embedding_copy_every = 5
    states = [_fill(StageState(job, s, seed_offset=s), float(s + 1)) for s in range(4)]
    _refresh(job, states, step=5)
    _fill(states[3], 7.0)                                  # the head moves on after the copy
    lost = _fill(StageState(job, 3, seed_offset=98), -3.0)
    lost.rebuild_from("checkfree_plus", [states[2].source_package()], lr_bump=1.1, step=6)
    sd = lost.model.state_dict()
    _assert_all(_layers(sd), 3.0)                          # stage 2's layers
    _assert_all(_ends(sd), 4.0)                            # norm + head as of the step-5 copy
    assert set(_ends(sd)) == {"norm.weight", "output.weight"}


def test_rebuilt_middle_stage_takes_a_fresh_copy_of_the_embedding():
    """Stage 1 lost and rebuilt by CheckFree: the copy of stage 0's embedding it must keep is taken
    from stage 0's current weights (1.25), not from the old copy (1.0) nor left empty."""
    job = _job(stages=4)
    states = [_fill(StageState(job, s, seed_offset=s), float(s + 1)) for s in range(4)]
    _refresh(job, states, step=job.recovery.embedding_copy_every)
    _fill(states[0], 1.25)
    lost = StageState(job, 1, seed_offset=97)
    lost.rebuild_from("checkfree", [states[0].source_package(), states[2].source_package()], 1.1, 4)
    assert set(lost.neighbour_copy) == {"tok_embeddings.weight"}
    _assert_all(lost.neighbour_copy, 1.25)


# --- 3. DiLoCo outer Nesterov step and alpha merge -------------------------------------------------------
class _TwoReplicaAverage:
    """compression.all_reduce as seen by replica A of two: the average of A's pseudo-gradient and the
    literal one replica B contributed (B's side of the network is what is faked, not the maths)."""

    def __init__(self, others):
        self.others = list(others)

    def __call__(self, tensors, codec, group=None, op="avg", async_op=False, **kw):
        assert op == "avg"
        other = self.others.pop(0)
        for t, o in zip(tensors, other):
            t.copy_((t + o) / 2)
        return compression.AllReduceHandle(list(tensors), 0)


def test_outer_nesterov_two_steps_and_alpha_merge(monkeypatch):
    """H = 2, P = 1, tau = 0, outer lr 0.7, momentum 0.9 (Nesterov), alpha = 0.25, 2 replicas.
    global_0 = [1.0, -2.0]
    sync 1 (t = 2): local_A = [0.5, -1.0]: delta_A = global - local = [0.5, -1.0]; delta_B = [0.3, 0.4]
        delta = mean = [0.4, -0.3]; buf = delta = [0.4, -0.3]
        Nesterov update = delta + 0.9 * buf = [0.76, -0.57]
        global_1 = global_0 - 0.7 * update = [1 - 0.532, -2 + 0.399] = [0.468, -1.601]
        local = 0.25 * local + 0.75 * global_1 = [0.125 + 0.351, -0.25 - 1.20075] = [0.476, -1.45075]
    sync 2 (t = 4): local_A = [0.2, -1.2]: delta_A = [0.268, -0.401]; delta_B = [0.1, 0.2]
        delta = [0.184, -0.1005]; buf = 0.9 * [0.4, -0.3] + delta = [0.544, -0.3705]
        update = delta + 0.9 * buf = [0.184 + 0.4896, -0.1005 - 0.33345] = [0.6736, -0.43395]
        global_2 = global_1 - 0.7 * update = [0.468 - 0.47152, -1.601 + 0.303765] = [-0.00352, -1.297235]
        local = 0.25 * [0.2, -1.2] + 0.75 * global_2 = [0.05 - 0.00264, -0.3 - 0.97292625]
              = [0.04736, -1.27292625]
    Plain momentum would give global_1 = [0.72, -1.79]; delta = local - global would move the other
    way; alpha on the global side would give local = 0.75 * [0.5, -1.0] + 0.25 * global_1 = [0.492, -1.15025]."""
    monkeypatch.setattr(diloco_mod.compression, "all_reduce",
                        _TwoReplicaAverage([[torch.tensor([0.3, 0.4])], [torch.tensor([0.1, 0.2])]]))
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    cfg = DilocoConfig(enabled=True, sync_every=2, fragments=1, overlap=0, alpha=0.25, outer_lr=0.7,
                       outer_momentum=0.9)
    d = StreamingDiLoCo({"layers.0.w": w}, cfg)
    with torch.no_grad():
        w.copy_(torch.tensor([0.7, -1.7]))
    d.after_inner_step(1)  # no sync before H steps
    assert d.num_syncs == 0
    torch.testing.assert_close(d.global_params()["layers.0.w"], torch.tensor([1.0, -2.0]), rtol=0, atol=0)
    with torch.no_grad():
        w.copy_(torch.tensor([0.5, -1.0]))
    d.after_inner_step(2)
    torch.testing.assert_close(d.global_params()["layers.0.w"], torch.tensor([0.468, -1.601]), rtol=0, atol=TOL)
    torch.testing.assert_close(w.detach(), torch.tensor([0.476, -1.45075]), rtol=0, atol=TOL)
    d.after_inner_step(3)
    with torch.no_grad():
        w.copy_(torch.tensor([0.2, -1.2]))
    d.after_inner_step(4)
    torch.testing.assert_close(d.global_params()["layers.0.w"], torch.tensor([-0.00352, -1.297235]), rtol=0,
                               atol=TOL)
    torch.testing.assert_close(w.detach(), torch.tensor([0.04736, -1.27292625]), rtol=0, atol=TOL)
    mom = d.state_dict()["fragments"][0]["momentum"]["layers.0.w"]
    torch.testing.assert_close(mom, torch.tensor([0.544, -0.3705]), rtol=0, atol=TOL)
    assert d.num_syncs == 2


def test_overlap_measures_delta_at_start_and_merges_the_later_local():
    """One replica, H = 2, tau = 1, lr 0.7, momentum 0.9, alpha 0.25. global_0 = 1.0.
    t = 2: local 0.6, delta = 0.4 measured now; the step is not applied yet (local stays 0.6).
    t = 3: the inner step moved local to 0.5; update = 1.9 * 0.4 = 0.76, global = 1 - 0.532 = 0.468;
    local = 0.25 * 0.5 + 0.75 * 0.468 = 0.476.
    (Merging local(t) = 0.6 would give 0.501; a delta measured at t + tau (0.5) would give global 0.335.)"""
    w = torch.nn.Parameter(torch.tensor([1.0]))
    cfg = DilocoConfig(enabled=True, sync_every=2, fragments=1, overlap=1, alpha=0.25, outer_lr=0.7,
                       outer_momentum=0.9)
    d = StreamingDiLoCo({"layers.0.w": w}, cfg)
    d.after_inner_step(1)
    with torch.no_grad():
        w.fill_(0.6)
    d.after_inner_step(2)
    assert d.num_syncs == 0 and torch.equal(w.detach(), torch.tensor([0.6]))  # untouched until t + tau
    assert float(d.global_params()["layers.0.w"]) == 1.0
    with torch.no_grad():
        w.fill_(0.5)
    d.after_inner_step(3)
    assert d.num_syncs == 1
    assert float(d.global_params()["layers.0.w"]) == pytest.approx(0.468, abs=TOL)
    assert float(w.detach()) == pytest.approx(0.476, abs=TOL)


def test_defaults_are_the_papers():
    cfg = DilocoConfig()
    assert (cfg.outer_lr, cfg.outer_momentum, cfg.alpha, cfg.assignment) == (0.7, 0.9, 0.5, "strided")


# --- 4. The sync schedule the trainer runs (after_inner_step), as literal tables ---------------------------
def _events(H, P, tau, T, layers=None):
    names = [f"layers.{i}.w" for i in range(layers or P)]
    params = {n: torch.nn.Parameter(torch.zeros(2)) for n in names}
    d = StreamingDiLoCo(params, DilocoConfig(enabled=True, sync_every=H, fragments=P, overlap=tau, alpha=0.0,
                                             outer_lr=1.0, outer_momentum=0.0))
    table = {}
    for t in range(1, T + 1):
        d.after_inner_step(t)
    for kind, p, t, _ in d.events:
        table.setdefault(t, {"start": [], "finish": []})[kind].append(p)
    return {t: (sorted(v["start"]), sorted(v["finish"])) for t, v in table.items()}


# Offsets t_p = floor(p * H / P); fragment p starts at H + t_p + k*H and is applied tau steps later.
SCHEDULES = [
    # H = 4, P = 3, tau = 0: t_p = 0, 1, 2 (4 // 3 = 1, 8 // 3 = 2).
    (4, 3, 0, 12, {4: ([0], [0]), 5: ([1], [1]), 6: ([2], [2]), 8: ([0], [0]), 9: ([1], [1]),
                   10: ([2], [2]), 12: ([0], [0])}),
    # H = 4, P = 3, tau = 1: each applied one step after it starts.
    (4, 3, 1, 12, {4: ([0], []), 5: ([1], [0]), 6: ([2], [1]), 7: ([], [2]), 8: ([0], []), 9: ([1], [0]),
                   10: ([2], [1]), 11: ([], [2]), 12: ([0], [])}),
    # H = 10, P = 4, tau = 1: t_p = 0, 2, 5, 7 (10 // 4 = 2, 20 // 4 = 5, 30 // 4 = 7).
    (10, 4, 1, 28, {10: ([0], []), 11: ([], [0]), 12: ([1], []), 13: ([], [1]), 15: ([2], []), 16: ([], [2]),
                    17: ([3], []), 18: ([], [3]), 20: ([0], []), 21: ([], [0]), 22: ([1], []), 23: ([], [1]),
                    25: ([2], []), 26: ([], [2]), 27: ([3], []), 28: ([], [3])}),
    # H = 6, P = 3, tau = 2 = H / P: a fragment is applied in the step the next one starts.
    (6, 3, 2, 20, {6: ([0], []), 8: ([1], [0]), 10: ([2], [1]), 12: ([0], [2]), 14: ([1], [0]),
                   16: ([2], [1]), 18: ([0], [2]), 20: ([1], [0])}),
]


@pytest.mark.parametrize("H,P,tau,T,want", SCHEDULES)
def test_sync_schedule_table(H, P, tau, T, want):
    assert _events(H, P, tau, T) == want


def test_the_scheduled_fragment_is_the_strided_layers():
    """6 layers, P = 3 strided: fragment 0 = layers 0, 3; 1 = layers 1, 4; 2 = layers 2, 5. H = 3,
    t_p = 0, 1, 2. With lr 1, no momentum, tau 0, a sync sets the global copy to the local one, so
    after t = 3 only layers 0 and 3 have moved globally, after t = 4 also 1 and 4."""
    params = {f"layers.{i}.w": torch.nn.Parameter(torch.zeros(1)) for i in range(6)}
    d = StreamingDiLoCo(params, DilocoConfig(enabled=True, sync_every=3, fragments=3, overlap=0, alpha=0.0,
                                             outer_lr=1.0, outer_momentum=0.0))
    moved = []
    for t in range(1, 6):
        with torch.no_grad():
            for p in params.values():
                p.add_(1.0)
        d.after_inner_step(t)
        moved.append(sorted(int(n.split(".")[1]) for n, g in d.global_params().items() if float(g) != 0.0))
    assert moved == [[], [], [0, 3], [0, 1, 3, 4], [0, 1, 2, 3, 4, 5]]
    g = d.global_params()
    assert [float(g[f"layers.{i}.w"]) for i in range(6)] == [3.0, 4.0, 5.0, 3.0, 4.0, 5.0]


def test_sync_schedule_with_overlap_longer_than_the_fragment_gap():
    # Was a bug: an in-flight fragment was sorted by the due step of the sync it was already running
    # and stopped the loop, so with tau > H/P later fragments started late and the syncs bunched up.
    # H = 4, P = 2, tau = 3: t_p = 0, 2. Fragment 0 starts at 4, 8, 12 and is applied at 7, 11, 15;
    # fragment 1 starts at 6, 10, 14 and is applied at 9, 13.
    want = {4: ([0], []), 6: ([1], []), 7: ([], [0]), 8: ([0], []), 9: ([], [1]), 10: ([1], []),
            11: ([], [0]), 12: ([0], []), 13: ([], [1]), 14: ([1], [])}
    assert _events(4, 2, 3, 14) == want
