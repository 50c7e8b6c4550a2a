"""The coordinator's state in etcd: one JSON document, written only by the current leader.

`EtcdStateStore` implements `recovery.state_store.StateStore` over one key, `<prefix>state`. Each
`save` is a transaction whose compare is the leader's fence (`Election.fence()`: the leader key is
still the one this process created), so a deposed leader - paused, partitioned, or simply slower
than its lease - cannot overwrite what its successor wrote; the refused write raises `Fenced` and
ends the leadership. The document records who wrote it:

    {"epoch": 3, "seq": 41, "candidate": "host:pid:tag", "state": {...the coordinator's state...}}

`seq` counts this leader's writes; with etcd's revision history (every version of the key, until
compaction) a test or an operator can check that writes never interleave between two leaders: the
epochs along the history never go down.

What is written when: the coordinator saves through `due()`. A state whose *control* part changed
(membership, slots, generations and their plans, pending rebuilds, counters, checkpoints) or that
store writes wait on (write-ahead, see recovery.board) is saved at once; one whose only changes are
watermarks (`WATERMARKS`: committed steps, totals, tokens, byte counts, heartbeat counts) is saved
at most every `flush_s` (whether the control part changed is checked every `COMPARE_S`, not at
every turn of the coordinator's loop: serialising the state costs CPU the workers may share). A successor therefore finds every control change, and watermarks at most
`flush_s` old, which it does not need anyway: it recounts them from metrics.jsonl (written before
any save) and the workers replay their commit records after the `recorded/<r>` it publishes.

Size: etcd refuses requests over `--max-request-bytes` (1.5 MiB by default); the state is written
whole, so a document near that size is refused here with the key's size and the fix, before etcd
answers with a less helpful error.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Callable, Iterator, Optional, Tuple

from .etcd_client import EtcdClient, EtcdError, b64
from .etcd_election import Election
from .records import dumps_strict
from .state_store import Fenced, Unavailable

log = logging.getLogger(__name__)

MAX_STATE_BYTES = 1_400_000   # under etcd's default 1.5 MiB request limit, with room for the envelope
# Fields of the coordinator's state that move with every step (or beat): coalesced, see `due`.
WATERMARKS = ("version", "committed", "totals", "tokens", "bytes")
WORKER_WATERMARKS = ("hb", "status")
COMPARE_S = 0.1   # a control change that no store write waits on is found this late at most


def control_part(state: dict) -> str:
    """The state without its watermarks, canonically serialised (equal strings: no control change)."""
    out = {k: v for k, v in state.items() if k not in WATERMARKS}
    workers = out.get("workers")
    if isinstance(workers, dict):
        out["workers"] = {w: {k: v for k, v in info.items() if k not in WORKER_WATERMARKS}
                          for w, info in workers.items()}
    return json.dumps(out, sort_keys=True, separators=(",", ":"), default=str)


class EtcdStateStore:
    """The leader's state document. `load()` is a linearizable read (any member, quorum-backed);
    `save()` needs `election.is_leader`."""

    write_ahead = True

    def __init__(self, client: EtcdClient, prefix: str, election: Optional[Election] = None, flush_s: float = 1.0):
        self.client, self.election = client, election
        self.key = prefix + "state"
        self.seq = 0
        self.flush_s = float(flush_s)
        self.last_epoch: Optional[int] = None   # the epoch of the document `load()` returned
        self._saved_control: Optional[str] = None
        self._saved_at = float("-inf")          # monotonic time of the last successful save
        self._compared_at = float("-inf")       # monotonic time `due` last serialised the state

    def leading(self) -> bool:
        return self.election is not None and self.election.confirm()

    def due(self, state: Callable[[], dict], waiting: bool) -> bool:
        now = time.monotonic()
        if waiting or now - self._saved_at >= self.flush_s:
            return True
        if now - self._compared_at < COMPARE_S:  # the coordinator asks every loop (10 ms): compare less often
            return False
        self._compared_at = now
        return control_part(state()) != self._saved_control

    def load(self) -> Optional[dict]:
        kv = self.client.get(self.key)
        if kv is None:
            return None
        doc = json.loads(kv["value"])
        self.last_epoch = doc["epoch"]
        return doc["state"]

    def save(self, state: dict) -> None:
        if self.election is None:
            raise Fenced("this state store reads only: it was opened without an election")
        election = self.election
        fence = election.fence()   # raises Fenced when the lease deadline already passed
        self.seq += 1
        body = dumps_strict({"epoch": election.epoch, "seq": self.seq, "candidate": election.candidate,
                             "state": state}, separators=(",", ":"))
        if len(body) > MAX_STATE_BYTES:
            raise ValueError(f"the coordinator state is {len(body)} bytes, more than etcd takes in one request "
                             f"({MAX_STATE_BYTES}); raise etcd's --max-request-bytes or use recovery.control=local")
        try:
            result = self.client.txn(fence, [{"request_put": {"key": b64(self.key), "value": b64(body)}}],
                                     election.leader_probe())
        except EtcdError as e:   # no quorum, a timeout, a refusal: not written; the lease decides who leads
            raise Unavailable(str(e)) from None
        if not result["succeeded"]:
            raise election.refused(result)
        self._saved_at = time.monotonic()
        self._saved_control = control_part(state)

    def history(self) -> Iterator[Tuple[int, dict]]:
        """Every version of the document still in etcd's history, newest first: (mod revision,
        envelope). Walks back through the MVCC store: the version before the one written at
        revision m is what a read at revision m - 1 returns."""
        revision: Optional[int] = None
        while True:
            kvs, _ = self.client.range(self.key, revision=revision)
            if not kvs:
                return
            kv = kvs[0]
            yield kv["mod_revision"], json.loads(kv["value"])
            if kv["mod_revision"] <= 1:
                return
            revision = kv["mod_revision"] - 1
