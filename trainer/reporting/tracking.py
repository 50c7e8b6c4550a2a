"""Live experiment tracking from the coordinator: one wandb run per job (offline by default), fed as
commits, evaluations and recovery events arrive, so a run can be watched while it trains.

x-axis: `trainer/step` (a retried or rolled-back step logs its step number again; wandb's own
`_step` only counts rows). Rows: `train/loss`, `train/grad_norm`, `train/lr`, `train/tokens_per_s`
(replica 0's commits), `val/loss`, and one row per event with `event/kind` (rebuild, suspend,
rebalance, placement, join_refused), `event/tier`, `event/slot`, `event/recover_s`, ... The run's
config is the job (token removed), its tags `logger.wandb.tags`. Tracking never stops training: any
wandb error disables it with one warning.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

log = logging.getLogger(__name__)
EVENT_KINDS = ("rebuild", "suspend", "rebalance", "placement", "join_refused")


class LiveWandb:
    def __init__(self, run):
        self.run = run
        self.t0 = time.time()
        self.tokens = 0
        self.last_step = -1

    @classmethod
    def start(cls, job: dict, run_dir: str, resume: bool = False) -> Optional["LiveWandb"]:
        """`resume`: a restarted coordinator continues the run it fed before (same wandb id)."""
        cfg = (job.get("logger") or {}).get("wandb") or {}
        mode = cfg.get("mode", "disabled")
        if mode == "disabled":
            return None
        try:
            import wandb
            config = dict(job, recovery={k: v for k, v in job.get("recovery", {}).items() if k != "token"})
            os.environ.setdefault("WANDB_SILENT", "true")
            id_path = os.path.join(run_dir, "wandb_id.txt")
            run_id = None
            if resume and os.path.exists(id_path):
                with open(id_path) as f:
                    run_id = f.read().strip() or None
            run = wandb.init(project=cfg.get("project", "kintsugi"), mode=mode, dir=run_dir, config=config,
                             tags=list(cfg.get("tags") or []), name=os.path.basename(os.path.normpath(run_dir)),
                             reinit="finish_previous", id=run_id, resume="allow" if run_id else None)
            with open(id_path, "w") as f:
                f.write(run.id)
            run.define_metric("trainer/step")
            for prefix in ("train/*", "val/*", "event/*"):
                run.define_metric(prefix, step_metric="trainer/step")
            return cls(run)
        except Exception as e:  # noqa: BLE001 - tracking must never stop a run
            log.warning("wandb tracking disabled: %s", str(e).splitlines()[0][:200])
            return None

    def _log(self, row: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.log(row)
        except Exception as e:  # noqa: BLE001
            log.warning("wandb tracking disabled: %s", str(e).splitlines()[0][:200])
            self.run = None

    def commit(self, c: dict) -> None:
        if c.get("loss") is None:  # a skipped (non-finite) step: nothing to plot
            return
        if c.get("replica", 0) != 0:
            return
        self.tokens += c.get("tokens", 0)
        self.last_step = c["step"]
        self._log({"trainer/step": c["step"], "train/loss": c["loss"], "train/grad_norm": c.get("grad_norm"),
                   "train/lr": c.get("lr"), "train/tokens_per_s": self.tokens / max(time.time() - self.t0, 1e-9)})

    def evaluation(self, e: dict) -> None:
        self._log({"trainer/step": e["step"], "val/loss": e["val_loss"]})

    def event(self, ev: dict) -> None:
        kind = ev.get("kind")
        if kind not in EVENT_KINDS:
            return
        row = {"trainer/step": ev.get("step", self.last_step + 1), "event/kind": kind}
        if kind == "rebuild":
            row.update({"event/tier": ev["tier"], "event/slot": f"r{ev['slot'][0]}s{ev['slot'][1]}",
                        "event/detect_s": ev.get("detect_s"), "event/recover_s": ev.get("recover_s")})
        elif kind == "rebalance":
            row.update({"event/layers_from": str(ev["from"]), "event/layers_to": str(ev["to"])})
        elif kind == "placement":
            row["event/placement"] = ev.get("summary", "")
        self._log(row)

    def finish(self, state: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update({k: v for k, v in state.items() if k in (
                "final_val_loss", "failures", "tokens", "wall_s", "generations", "error")})
            self.run.summary["rebuilds"] = len(state.get("rebuilds", []))
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            log.warning("wandb finish failed: %s", str(e).splitlines()[0][:200])
        self.run = None


def read_offline_run(path: str):
    """Records of an offline run's `run-<id>.wandb` file (a block log of protobuf records), without
    syncing it anywhere: returns (config dict, tags, history rows). For tests and quick looks."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb
    with open(path, "rb") as f:
        data = f.read()
    block, pos, buf = 32768, 7, b""  # 7-byte file header: ":W&B", magic, version
    config, tags, rows = {}, [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf += chunk
        if kind not in (1, 4):  # FIRST / MIDDLE pieces of a record continue in the next block
            continue
        rec = pb.Record()
        rec.ParseFromString(buf)
        buf = b""
        which = rec.WhichOneof("record_type")
        if which == "run":
            tags = list(rec.run.tags)
            config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif which == "config":
            config.update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif which == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return config, tags, rows
