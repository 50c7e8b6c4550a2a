"""Command-line probes of the etcd control plane, before (and without) a coordinator.

    python -m kintsugi.recovery.etcd_tool check    --endpoints URL[,URL...] --prefix /kintsugi/run1/
    python -m kintsugi.recovery.etcd_tool leader   --endpoints ... --prefix ...
    python -m kintsugi.recovery.etcd_tool campaign --endpoints ... --prefix ... [--ttl 3] [--save-every 0.1]

`check` answers the question a launcher asks first: can this machine reach the cluster, with a
quorum, and read the run's prefix with the credentials in its environment (KINTSUGI_ETCD_*)? It
prints one line and exits 0, or one line naming what is wrong and the fix and exits 2.

`leader` prints who leads the run (one JSON line).

`campaign` is what a standby coordinator does, minus the coordinator: it campaigns, and while it
leads it saves a small state document every `--save-every` seconds through the fenced store. It
prints one JSON line per event, timed with the system-wide monotonic clock so that lines of several
processes on one machine can be compared: `leader` (epoch), `lost` (it stopped leading: the moment
it stops acting), `fenced` (a write etcd refused), `saved` (every 50th write). With `--rejoin` it
campaigns again after losing. The tests and `benchmarks.control_failover` kill, pause and partition
these processes.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from typing import List, Optional

from .etcd_client import EtcdClient, EtcdError, EtcdSettings
from .etcd_election import Election, find_leader
from .etcd_state import EtcdStateStore
from .state_store import Fenced, Unavailable


def _emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


def _settings(args) -> EtcdSettings:
    return EtcdSettings(endpoints=args.endpoints, prefix=args.prefix, lease_ttl_s=args.ttl,
                        request_timeout_s=args.timeout)


def _check(args) -> int:
    settings = _settings(args)
    client = EtcdClient.from_settings(settings)
    client.check(settings.prefix)
    print(f"etcd ok: {client.endpoint} answers with a quorum; prefix {settings.prefix} is readable")
    return 0


def _leader(args) -> int:
    settings = _settings(args)
    info = find_leader(EtcdClient.from_settings(settings), settings.prefix)
    print(json.dumps(None if info is None else info.__dict__))
    return 0


def _campaign(args) -> int:
    settings = _settings(args)
    client = EtcdClient.from_settings(settings)
    client.check(settings.prefix)
    election = Election(client, settings.prefix, ttl_s=settings.lease_ttl_s, candidate=args.name,
                        grace_s=settings.lease_grace_s)
    store = EtcdStateStore(client, settings.prefix, election)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _emit("candidate", candidate=election.candidate)
    while not stop.is_set():
        if not election.campaign(stop=stop):
            break
        _emit("leader", epoch=election.epoch, candidate=election.candidate, revision=election.revision)
        try:
            if args.address:
                election.publish(args.address)
        except Fenced as e:            # deposed between winning and publishing: lead no further
            _emit("fenced", epoch=election.epoch, error=str(e))
        held_until = None if args.hold is None else time.monotonic() + args.hold
        n = 0
        while not stop.is_set() and election.confirm():
            if held_until is not None and time.monotonic() >= held_until:
                election.resign()
                break
            try:
                store.save({"candidate": election.candidate, "epoch": election.epoch, "n": n})
                n += 1
                if n % 50 == 0:
                    _emit("saved", epoch=election.epoch, seq=store.seq)
            except Fenced as e:
                _emit("fenced", epoch=election.epoch, error=str(e))
                break
            except (EtcdError, Unavailable) as e:   # an outage: the lease decides whether we still lead
                _emit("write_failed", epoch=election.epoch, error=str(e))
            stop.wait(args.save_every)
        if stop.is_set():
            break                  # close() below resigns: a standby takes over at once
        # When the leadership ended: the renewal thread gives the lease up once its deadline and the
        # grace after it passed, which this loop may notice first; a refusal or resignation ends it
        # here.
        election.lost.wait(settings.lease_ttl_s + election.grace_s)
        _emit("lost", epoch=election.epoch, at=election.lost_at, saves=n)
        if not args.rejoin:
            break
    election.close()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kintsugi.recovery.etcd_tool", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["check", "leader", "campaign"])
    p.add_argument("--endpoints", required=True, help="the cluster's client URLs, comma-separated")
    p.add_argument("--prefix", required=True, help="the run's key prefix (recovery.etcd.prefix)")
    p.add_argument("--ttl", type=int, default=3, help="lease TTL in seconds (recovery.etcd.lease_ttl_s)")
    p.add_argument("--timeout", type=float, default=2.0, help="per request and endpoint, seconds")
    p.add_argument("--name", default=None, help="campaign: this candidate's name")
    p.add_argument("--address", default=None, help="campaign: the store address to publish when leading")
    p.add_argument("--save-every", type=float, default=0.1, help="campaign: seconds between state writes")
    p.add_argument("--hold", type=float, default=None, help="campaign: resign after leading this long")
    p.add_argument("--rejoin", action="store_true", help="campaign: campaign again after losing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    try:
        return {"check": _check, "leader": _leader, "campaign": _campaign}[args.command](args)
    except (ValueError, EtcdError) as e:
        print(f"kintsugi etcd: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
