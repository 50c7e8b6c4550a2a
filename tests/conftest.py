"""Shared test setup: one thread per process, wandb off, GPU tests skipped without CUDA. The helpers
tests import live in tests/testkit.py."""
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def undisturbed_attack_run(tmp_path_factory):
    """The job every attack test of tests/distributed (test_trust, test_freshness) runs, left alone:
    (summary, metrics records). The token does not enter training, so one run serves tests whose
    runs use different tokens."""
    from testkit import ATTACK_JOB, run_trainer
    _, summary, records = run_trainer(tmp_path_factory.mktemp("undisturbed") / "run", *ATTACK_JOB,
                                      env={"KINTSUGI_TOKEN": "und1sturbed-" + "0f" * 8})
    return summary, records
