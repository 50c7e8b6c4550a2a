"""How a worker stops: the end of a run, a suspend, and a coordinator that never came back.

- The end of the run: every step is committed. Replica 0 runs the final evaluation (also when a
  generation change landed after the last commit; the last stage marks it done once published) and
  writes its stage's final weights (`kintsugi export` assembles the model); every worker sends its
  final byte counts and its end marker, then waits for the coordinator's shutdown.
- A suspend (the job is preempted and no spare is left to hand off to): each slot writes its last
  committed state as a checkpoint, which `train.resume` continues exactly, and stops.
- The coordinator stayed away beyond recovery.coordinator_wait_s: keep what the slot committed and
  exit 75 (resumable), never 0.

Each function takes the worker (`w`) and reads the few attributes it names.
"""
from __future__ import annotations

import logging
import os
import sys
import time

from kintsugi.recovery.plan import SuspendPlan
from kintsugi.recovery.protocol import FINAL_EVAL_KEY
from kintsugi.recovery.runfiles import EX_SUSPENDED

log = logging.getLogger("kintsugi.worker")


def end_of_run(w) -> None:
    if w.slot[0] == 0:
        try:
            done_already = w.control.get_json_or(FINAL_EVAL_KEY) is not None
        except Exception:  # noqa: BLE001 - the coordinator is away: evaluate anyway
            done_already = False
        if not done_already:
            w.evaluate(w.job.train.max_steps, True)
        save_final_weights(w)
    try:  # the final byte counts (the heartbeat's may predate the final evaluation), then "done"
        w.control.put_json(f"bytes/{w.wid}", w.counter.as_dict())
        w.control.put_json(f"end/{w.wid}", True)
    except Exception:  # noqa: BLE001 - the coordinator is away: it reads the heartbeat's counts
        pass
    wait_for_shutdown(w)


def save_final_weights(w) -> None:
    from safetensors.torch import save_file
    out = os.path.join(w.run_dir, "final")
    os.makedirs(out, exist_ok=True)
    stage = w.slot[1]
    sd = {k: v.detach().to("cpu").contiguous() for k, v in w.state.model.state_dict().items()}  # CPU files
    tmp = os.path.join(out, f"stage{stage}.safetensors.tmp")
    try:
        save_file(sd, tmp)
        os.replace(tmp, os.path.join(out, f"stage{stage}.safetensors"))
    except Exception as e:  # noqa: BLE001 - disk full (safetensors raises its own error type)
        try:
            os.remove(tmp)
        except OSError:
            pass
        msg = f"final/stage{stage}.safetensors: {str(e).splitlines()[0][:200]}"
        log.error("cannot write the final weights (%s)", msg)
        try:  # the coordinator's exit code and summary say so
            w.control.put_json(f"final_error/{stage}", msg)
        except Exception:  # noqa: BLE001
            pass


def suspend(w, plan: SuspendPlan) -> int:
    if not save_for_suspend(w, plan):
        return 0  # a spare, or a slot someone else holds
    wait_for_shutdown(w, saved=True)
    return 0


def save_for_suspend(w, plan: SuspendPlan) -> bool:
    """The slot this worker holds in the suspend plan saves its committed state and says so."""
    if w.slot is None or plan.holders.get(tuple(w.slot)) != w.wid:
        return False
    step = save_committed(w)
    w.control.append_later("suspended", {"wid": w.wid, "slot": list(w.slot), "step": step})
    return True


def save_committed(w) -> int:
    """This slot's last committed state as a checkpoint (synchronously). A step whose commit was
    never seen is not in it: a resume retries that step on the same batch."""
    w.commit.pending = None
    step = w.state.step_done
    if step >= 0:
        path = w.checkpointer.save_now(w.state, w.slot, step)
        log.warning("slot %s saved at step %d to %s", w.slot, step, path)
    return step


def give_up(w) -> int:
    if w.state is not None and w.slot is not None and w.state.step_done >= 0:
        step = save_committed(w)
        print(f"kintsugi worker {w.wid}: the coordinator is gone; slot {list(w.slot)} saved at step "
              f"{step} in {w.run_dir}/checkpoints; restart it with `kintsugi coordinator --resume "
              f"--run-dir {w.run_dir} --port {w.control.port}` or resume the job with train.resume",
              file=sys.stderr)
        return EX_SUSPENDED
    print(f"kintsugi worker {w.wid}: the coordinator is gone and this worker held no state", file=sys.stderr)
    return 1


def wait_for_shutdown(w, saved: bool = False) -> None:
    """Serve peers until the coordinator shuts the run down. A replica that finished its steps
    while another still trains waits here too: if the job suspends meanwhile, its slots save."""
    while not w.watcher.shutdown.is_set() and not w.watcher.store_lost.is_set():
        if not saved and w.watcher.suspend_plan is not None:
            saved = True
            save_for_suspend(w, w.watcher.suspend_plan)
        w.idle()
        if w.diloco is not None and w.watcher.suspend_plan is None:
            w.diloco.serve_idle()
        time.sleep(0.02)
