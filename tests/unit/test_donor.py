"""A peer donation costs the donor one serialisation of its stage: the test-dump snapshot (a full
copy of the stage) is built only when KINTSUGI_DUMP_DIR asks for dumps."""
import threading

import pytest

from kintsugi.recovery.plan import DonateRequest
from kintsugi.recovery.rebuild import unpack
from kintsugi.trainer.config.job import JobConfig, ParallelConfig
from kintsugi.trainer.model.llama import ModelConfig
from kintsugi.trainer.runtime import rebuild
from kintsugi.trainer.runtime.stage import StageState


class _Host:
    def __init__(self):
        self.job = JobConfig(model=ModelConfig(dim=16, n_layers=4, n_heads=2, n_kv_heads=2, vocab_size=32,
                                               max_seq_len=128), parallel=ParallelConfig(stages=2))
        self.state, self.diloco, self.slot = StageState(self.job, 1), None, (1, 1)


@pytest.fixture
def served(monkeypatch):
    """Donor.serve with the transfer thread captured (its payload) instead of started."""
    sent = []

    class _Thread:
        def __init__(self, target, args, **kw):
            sent.append(args[1])

        def start(self):
            pass

    monkeypatch.setattr(rebuild.threading, "Thread", _Thread)
    copies = []
    real = rebuild.snapshot
    monkeypatch.setattr(rebuild, "snapshot", lambda host, **kw: copies.append(1) or real(host, **kw))
    host = _Host()
    donor = rebuild.Donor(host, threading.Event())
    donor.request(DonateRequest("xfer/x", "w9", (0, 1), (1, 1), gen=3))
    return host, donor, sent, copies


def test_without_dumps_the_donor_builds_no_snapshot(served, monkeypatch):
    host, donor, sent, copies = served
    monkeypatch.delenv("KINTSUGI_DUMP_DIR", raising=False)
    donor.serve()
    assert copies == [], "the test-dump snapshot was built although dumps are off"
    (payload,) = sent
    got = unpack(payload)  # what travels is the stage's state_dict, whole
    assert got["layer_ids"] == host.state.layer_ids and set(got["params"]) == set(host.state.model.state_dict())


def test_with_dumps_the_snapshot_is_built_and_saved(served, monkeypatch, tmp_path):
    host, donor, sent, copies = served
    monkeypatch.setenv("KINTSUGI_DUMP_DIR", str(tmp_path))
    donor.serve()
    assert copies == [1] and (tmp_path / "g3_source0_0,1_before.pt").exists() and len(sent) == 1
