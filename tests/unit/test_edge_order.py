"""NCCL ignores tags and matches point-to-point messages in issue order, so on every directed edge
the receiver must post its receives in the order the sender posts its sends. Observed on the real
StageExecutor of every stage (a transport that records what each stage posts, in order), for every
schedule, plain and CheckFree+ alternating routes, S = 2..8, M = 1..8."""
import itertools

import pytest
import torch

from kintsugi.parallel.schedules import StageExecutor, actions_for, routes_for

H, T = 4, 3  # hidden size, sequence length


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, H)
        self.lin = torch.nn.Linear(H, H)
        self.out = torch.nn.Linear(H, 11)

    def embed(self, x):
        return self.emb(x)

    def forward_layers(self, x):
        return self.lin(x)

    def head(self, x):
        return self.out(x)


class Recorder:
    """Posts nothing anywhere: records, per stage, the order of its sends and receives."""

    def __init__(self, stage, log):
        self.stage, self.log = stage, log

    def send(self, tensor, dst, tag, channel="p2p"):
        self.log.setdefault(("send", self.stage, dst), []).append((tag, tuple(tensor.shape)))

    def recv(self, shape, src, tag, channel="p2p", dtype=torch.float32):
        self.log.setdefault(("recv", src, self.stage), []).append((tag, tuple(shape)))
        return torch.zeros(shape, dtype=dtype)

    def flush(self):
        pass


def _posted(schedule, S, M, alternate):
    routes = routes_for(S, M, alternate)
    log = {}
    torch.manual_seed(0)
    inputs = torch.randint(0, 11, (M, T))
    for s in range(S):
        ex = StageExecutor(Tiny(), s, S, Recorder(s, log), lambda st: st, H,
                           lambda out, tgt: torch.nn.functional.cross_entropy(out.reshape(-1, 11), tgt.reshape(-1)))
        ex.run(inputs, inputs, routes, actions_for(schedule, s, S, routes))
    return log


@pytest.mark.parametrize("schedule,alternate", [("gpipe", False), ("gpipe", True), ("1f1b", False), ("1f1b", True)])
def test_every_edge_receives_in_the_order_it_was_sent(schedule, alternate):
    for S, M in itertools.product(range(2, 9), range(1, 9)):
        log = _posted(schedule, S, M, alternate)
        edges = {(a, b) for kind, a, b in log}
        assert edges, (S, M)
        for a, b in sorted(edges):
            sent, received = log.get(("send", a, b), []), log.get(("recv", a, b), [])
            assert sent == received, f"{schedule} S={S} M={M} edge {a}->{b}: sent {sent}, received {received}"


def test_the_reported_swap_is_gone():
    # The case from the issue: S=2, M=3, 1F1B on CheckFree+'s routes, edge 0->1.
    log = _posted("1f1b", 2, 3, True)
    assert log[("send", 0, 1)] == log[("recv", 0, 1)]
    assert len(log[("send", 0, 1)]) > 3  # forwards and backwards both travel 0->1 on swapped routes
