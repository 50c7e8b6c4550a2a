"""Fixtures for the etcd control plane: a real three-member etcd cluster on loopback ports (Debian's
etcd-server, installed with apt-get when missing and this runs as root; the tests skip, saying why,
when it cannot be), and campaigner processes stopped at teardown."""
import pytest

from etcd_helpers import Campaigner, Namespace, etcd_missing, netns_unavailable
from kintsugi.recovery.etcd_local import LocalEtcd


@pytest.fixture
def etcd_available():
    """Skips the test, with the reason, when etcd cannot run here."""
    why = etcd_missing()
    if why:
        pytest.skip(why)


@pytest.fixture
def etcd_cluster(etcd_available):
    """A cluster of its own, for a test that kills members or changes the cluster (auth)."""
    cluster = LocalEtcd(3).start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def shared_etcd():
    """One cluster for the tests of a module that leave its members alone (each on its own prefix)."""
    why = etcd_missing()
    if why:
        pytest.skip(why)
    cluster = LocalEtcd(3).start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def campaigners(tmp_path):
    """Start campaigners with `campaigners.start(...)`; all are stopped at teardown."""
    started = []

    class Factory:
        def start(self, *args, **kwargs):
            c = Campaigner(*args, workdir=str(tmp_path), **kwargs)
            started.append(c)
            return c

    yield Factory()
    for c in started:
        c.stop()


@pytest.fixture
def namespace():
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    ns = Namespace()
    try:
        yield ns
    finally:
        ns.close()
