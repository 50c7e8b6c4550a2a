"""The coordinator process: `python -m trainer.cli.coordinator` (launchers) or `kintsugi coordinator`
(a stable host for torchrun nodes and `kintsugi join`).

The coordinator itself (recovery.coordinator) knows membership and generations only; this entry
point supplies the trainer's side: composing the job from Hydra overrides and preparing the corpus
(standalone), the resume points of `train.resume`, the live wandb run, and `summary.json` /
`loss.png` at the end. `--resume` restarts a coordinator that died, from the state it persisted in
the run directory, on the same address: the workers re-register and the run goes on.

With `recovery.control=etcd` (recovery.etcd_leader) the start is: check the cluster (one line and
exit 2 when it cannot be used; nothing started), refuse a new run's prefix that holds another run's
state, campaign (a `--standby` waits here), load the state from etcd, serve a store of its own on
`--host`/`--port`, publish its address. A deposed leader re-executes itself as a standby; a standby
that wins a run that already ended exits 0. A standby waits out a cluster without quorum (the check
only names it): a leader deposed by a lost quorum is re-executed while that quorum is still lost.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time

from kintsugi.recovery import protocol as P
from kintsugi.recovery.coordinator import Coordinator
from kintsugi.recovery.runfiles import EX_RECORD, EX_RESTART_STORE, FINAL_STATE, JOB, TOKEN, CONTROL_STATE as STATE_FILE

log = logging.getLogger("kintsugi.coordinator")


def resume_state(run_dir: str, job: dict):
    """(resume_from, resume_missing, layout, error) for `train.resume`: every replica continues from
    its newest step whose stages all saved; stages a suspend could not save (lost without a spare)
    are rebuilt from the restored ones."""
    from kintsugi.recovery.checkpoint import checkpoint_path, is_complete
    from kintsugi.recovery.resume_points import resume_points
    R, S = job["parallel"]["replicas"], job["parallel"]["stages"]
    points = resume_points(run_dir, R, S)
    missing = {}
    if points is None:
        # A suspend that lost slots: take each replica's newest step where its other stages saved.
        suspend = _suspend_record(run_dir)
        if suspend is None:
            return None, None, None, f"train.resume={run_dir} holds no checkpoint complete for every replica"
        points = {}
        lost = {tuple(s) for s in suspend.get("lost") or []}
        for r in range(R):
            saved = [int(k) for key, k in (suspend.get("suspended") or {}).items() if int(key.split(",")[0]) == r]
            if not saved:
                return None, None, None, f"train.resume={run_dir}: replica {r} saved nothing before the suspend"
            step = max(saved)
            gone = [s for s in range(S) if (r, s) in lost or not is_complete(checkpoint_path(run_dir, step, (r, s)))]
            points[r] = step
            if gone:
                missing[r] = gone
    layout = None
    layout_path = os.path.join(run_dir, "checkpoints", "layout.json")
    if os.path.exists(layout_path):  # a rebalanced job suspended: rebuild its stages as they were
        with open(layout_path) as f:
            layout = json.load(f)["layers_per_stage"]
    log.info("resuming in %s from step(s) %s%s", run_dir,
             ", ".join(f"replica {r}: {k}" for r, k in sorted(points.items())),
             f"; rebuilding lost slots {missing}" if missing else "")
    return points, missing, layout, None


def prepare_job(overrides: list) -> tuple:
    """The job and corpus entry for a coordinator started from Hydra overrides: the same config the
    CLI composes, the corpus prepared (cached) on this host, the vocabulary size filled in, as
    `trainer.cli.entry.train` does before launching. Raises ConfigError with a one-line message."""
    from kintsugi.trainer.cli.entry import prepare_corpus_and_model
    from kintsugi.trainer.cli.compose import compose_job, validate_overrides
    from kintsugi.trainer.config.errors import ConfigError

    err = validate_overrides(list(overrides))
    if err:
        raise ConfigError(err)
    job, _ = compose_job(list(overrides))
    corpus_d = prepare_corpus_and_model(job)
    return job.to_dict(), corpus_d


def _new_token_shown_once(run_dir: str, host: str, port: int) -> str:
    """A run always has a token. None was given: make one and show it once, with how to join, on the
    terminal only (a log file is no place for it); it is also written to RUN_DIR/.token (mode 0600)
    for the launcher's own nodes and for a restarted coordinator."""
    from kintsugi.recovery.auth import new_token
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, TOKEN)
    if os.path.exists(path):  # a restart (--resume) keeps the run's token
        with open(path) as f:
            return f.read().strip()
    token = new_token()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    join = f"KINTSUGI_TOKEN=<token> kintsugi join --coordinator {socket.gethostname() if host in ('0.0.0.0', '::') else host}:{port}"
    if sys.stderr.isatty():
        print(f"kintsugi coordinator: no token given; this run's token is {token}\n  workers join with: "
              f"{join.replace('<token>', token)}", file=sys.stderr)
    else:
        log.warning("no token given: generated one, readable only by this user in %s; workers join with %s",
                    path, join)
    return token


def _suspend_record(run_dir: str):
    path = os.path.join(run_dir, FINAL_STATE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        st = json.load(f)
    if not st.get("suspended"):
        return None
    return {"suspended": st["suspended"], "lost": st.get("suspend_lost")}


def _start_dashboard(job: dict, run_dir: str, host: str, token: str, coordinator):
    """The status page of `logger.dashboard_port` (trainer.reporting.dashboard), on the store's interface, or None.
    A port that is taken costs the dashboard, not the run."""
    port = int(job.get("logger", {}).get("dashboard_port") or 0)
    if port <= 0:
        return None
    from kintsugi.trainer.reporting.dashboard import Dashboard

    def heartbeat_ages():
        # Read from the dashboard's thread while the coordinator's loop runs: a snapshot of the
        # values, retried if the dict changes size under us (a worker joining).
        for _ in range(3):
            try:
                return coordinator.membership.heartbeat_ages()
            except RuntimeError:
                continue
        return {}

    try:
        dash = Dashboard(run_dir, token, host, port, heartbeat_ages=heartbeat_ages).start()
    except OSError as e:
        log.warning("logger.dashboard_port=%d: cannot listen on %s (%s); the run goes on without a dashboard",
                    port, host, e)
        return None
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    log.info("dashboard: http://%s:%d/ (asks for the run's token; /status.json wants "
             "'Authorization: Bearer <token>')", shown, dash.port)
    return dash


# --- recovery.control=etcd ----------------------------------------------------------------------------
def _etcd_lead(args, job: dict):
    """(Leadership that leads now, saved state or None, error line or None); blocks while standing by."""
    from kintsugi.recovery.etcd_client import EtcdError, EtcdUnavailable
    from kintsugi.recovery.etcd_leader import Leadership, PrefixTaken
    from kintsugi.trainer.config.job import JobConfig
    from kintsugi.trainer.launch.etcd_control import default_prefix
    cfg = JobConfig.from_dict(job).recovery.etcd
    try:
        settings = cfg.settings(cfg.prefix or default_prefix(job["name"], args.run_dir))
        lead = Leadership(settings, flush_s=cfg.flush_s, on_deposed=_reexec_as_standby, candidate=_candidate())
        try:
            lead.check()
        except EtcdUnavailable as e:
            # A standby waits out an outage in its campaign. It must: a leader deposed because the
            # cluster lost its quorum re-executes itself as a standby while that quorum is still
            # lost, and its exit would end the run (the launcher takes a leader's exit for the run's).
            if not args.standby:
                raise
            log.warning("standby: etcd does not answer now (%s); campaigning until it does", e)
        if not args.standby and not job["train"].get("resume"):
            lead.refuse_taken()
        now = None if args.standby else lead.leader()
        if now is not None:  # train.resume beside a live run: this one would wait, then wipe its state
            return None, None, (f"kintsugi coordinator: recovery.control=etcd: a coordinator leads the run under "
                                f"{settings.prefix} now (epoch {now.epoch}, {now.candidate}): start this one with "
                                "--standby to take that run over when it is gone, or give this run a prefix of its own")
    except (ValueError, EtcdError, PrefixTaken) as e:
        return None, None, f"kintsugi coordinator: recovery.control=etcd: {e}"
    lead.campaign()
    saved = lead.store.load()
    if saved is not None and not args.standby and job["train"].get("resume"):
        # train.resume starts again from the checkpoints; the control state under the prefix is the
        # previous run's (a requeued Slurm job resumes in the same run dir, hence the same prefix).
        log.warning("train.resume: the control state under %s (%s) is the previous run's; starting from the "
                    "checkpoints instead", settings.prefix, saved.get("ended") or "it did not end")
        saved = None
    return lead, saved, None


def _candidate():
    """The name this coordinator campaigns under: host:pid:tag, the tag led by KINTSUGI_CANDIDATE_TAG
    when a launcher set one (so that it knows its own standbys on other nodes), else the default."""
    tag = os.environ.get("KINTSUGI_CANDIDATE_TAG", "").replace(":", "_")
    if not tag:
        return None
    import uuid
    return f"{socket.gethostname()}:{os.getpid()}:{tag}-{uuid.uuid4().hex[:6]}"


def _reexec_as_standby(why: str) -> None:
    """Deposed: act no further. Re-executing closes the store (its workers look for the next
    leader) and makes this process a standby again, with the arguments it was started with."""
    log.error("deposed (%s); restarting as a standby", why)
    logging.shutdown()
    sys.stderr.flush()
    argv = list(sys.orig_argv[1:])
    if "--standby" not in argv:
        argv.insert(argv.index("--") if "--" in argv else len(argv), "--standby")
    os.execv(sys.executable, [sys.executable] + argv)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _restart_with_a_fresh_store(args) -> None:
    """The coordinator saved its state because its store was flooded: replace this process by a
    coordinator restarted from that state on the same address (same pid: a launcher watching it
    sees no exit; the old store's socket closes on exec). The token comes from the environment or
    the run dir's token file, as for any restart."""
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, "-m", "kintsugi.trainer.cli.coordinator", "--port", str(args.port), "--host", args.host,
            "--run-dir", args.run_dir, "--resume"] + (["--job", args.job] if args.job else []) + \
        (["--no-progress"] if args.no_progress else []) + (["--outputs"] if args.outputs else [])
    os.execv(sys.executable, argv)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="kintsugi coordinator",
        description="Kintsugi coordinator (hosts the store, owns membership). Launchers start it with --job; "
        "on a stable host for torchrun nodes and `kintsugi join`, start it with the job's Hydra overrides: "
        "kintsugi coordinator --port 29400 --run-dir outputs/run1 -- experiment=quick parallel.stages=4")
    ap.add_argument("--port", type=int, default=None, help="required, except with --resume (the port it had)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="the interface the store listens on (only that one): 127.0.0.1 by default; a "
                    "machine's address (or 0.0.0.0) for workers on other machines")
    ap.add_argument("--run-dir", default=None, help="required, except with --resume RUN_DIR")
    ap.add_argument("--job", default=None, help="job config JSON written by a launcher (or a run's job.json); "
                    "without it the job is composed from the overrides and the corpus prepared here")
    ap.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                    help=f"restart a coordinator that died, on the same address: its state is read from "
                    f"RUN_DIR/{STATE_FILE}; the workers re-register and the run goes on")
    ap.add_argument("--outputs", action="store_true",
                    help="write summary.json and loss.png when the run ends (implied without --job)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--standby", action="store_true",
                    help="recovery.control=etcd: campaign and wait; lead (from the state in etcd, on this --host/"
                    "--port) when the leader is gone")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for `kintsugi` (only without --job)")
    args = ap.parse_args(argv)
    if isinstance(args.resume, str):
        args.run_dir = args.run_dir or args.resume
        args.resume = True
    if args.run_dir is None:
        ap.error("--run-dir is required (or --resume RUN_DIR)")
    if args.port is None and args.resume:
        try:
            with open(os.path.join(args.run_dir, STATE_FILE)) as f:
                args.port = json.load(f).get("port")
        except (OSError, ValueError):
            pass
    if args.port is None:
        ap.error(f"--port is required ({STATE_FILE} in {args.run_dir} does not say it)" if args.resume
                 else "--port is required")
    if args.job and args.overrides:
        ap.error(f"pass either --job or overrides, not both (got {args.overrides[0]!r} with --job)")
    P.die_with_parent()
    logging.basicConfig(level=os.environ.get("KINTSUGI_LOG", "INFO"),
                        format="[coordinator] %(levelname)s %(message)s")
    corpus = None
    job_path = args.job
    if args.resume and not job_path:
        job_path = os.path.join(args.run_dir, JOB)  # a standalone coordinator wrote it there
        if args.overrides:
            ap.error("--resume takes the job from the run directory; drop the overrides")
    if args.resume and not os.path.exists(os.path.join(args.run_dir, STATE_FILE)):
        print(f"kintsugi coordinator: --resume: {args.run_dir} has no {STATE_FILE}; nothing to restart",
              file=sys.stderr)
        return 2
    if job_path:
        with open(job_path) as f:
            job = json.load(f)
        progress = not args.no_progress
    else:
        # Standalone: this process is the only one that knows the whole job, so it prepares the
        # corpus (the token cache) and serves it; nodes and `kintsugi join` workers need nothing else.
        from kintsugi.trainer.config.errors import ConfigError
        try:
            job, corpus = prepare_job(args.overrides)
        except ConfigError as e:
            print(f"kintsugi coordinator: config error: {e}", file=sys.stderr)
            return 2
        progress = not args.no_progress and job["logger"]["progress"]
    token = P.resolve_token(job["recovery"].get("token", ""))
    if not token:
        token = _new_token_shown_once(args.run_dir, args.host, args.port)
    # Anyone who reaches the store can read `job`: the token stays out of it (and out of job.json).
    job = dict(job, recovery=dict(job["recovery"], token=""))
    if not job_path and job["train"].get("resume"):  # before job.json is rewritten: it says what wrote them
        from kintsugi.trainer.cli.resuming import check_resume
        from kintsugi.trainer.config.errors import ConfigError
        from kintsugi.trainer.config.job import JobConfig
        try:
            check_resume(JobConfig.from_dict(job), args.run_dir)
        except ConfigError as e:
            print(f"kintsugi coordinator: config error: {e}", file=sys.stderr)
            return 2
    if not job_path:
        os.makedirs(args.run_dir, exist_ok=True)
        with open(os.path.join(args.run_dir, JOB), "w") as f:
            json.dump(job, f, indent=1)
    lead = saved = None
    if job["recovery"].get("control") == "etcd":
        lead, saved, err = _etcd_lead(args, job)
        if err:
            print(err, file=sys.stderr)
            return 2
        if saved is not None and saved.get("ended"):
            print(f"kintsugi coordinator: the run under {lead.settings.prefix} already ended ({saved['ended']}); "
                  "nothing to take over", file=sys.stderr)
            lead.resign()
            return 0
        if not _port_free(args.host, args.port):  # a standby's port may have been taken while it waited
            args.port = P.free_port()
        args.resume = args.resume or saved is not None
    elif args.standby:
        ap.error("--standby needs recovery.control=etcd (standbys campaign for the lead in etcd)")
    resume_from = resume_missing = layout = None
    if job["train"].get("resume") and not args.resume:
        resume_from, resume_missing, layout, err = resume_state(args.run_dir, job)
        if err:
            print(f"kintsugi: run stopped: {err}", file=sys.stderr)
            return 3
    from kintsugi.trainer.reporting.tracking import LiveWandb  # wandb run fed live (logger.wandb.mode != disabled)
    tracker = LiveWandb.start(job, args.run_dir, resume=args.resume)
    # Before the coordinator exists a SIGTERM just ends the process (143, not a success).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    t0 = time.time()
    coordinator = Coordinator(job, args.run_dir, args.port, args.host, token, progress=progress, tracker=tracker,
                              resume_from=resume_from, resume_missing=resume_missing, layout=layout,
                              corpus=corpus, restore=args.resume, state_store=lead.store if lead else None,
                              min_incarnation=lead.epoch if lead else 0)
    signal.signal(signal.SIGTERM, coordinator.on_sigterm)
    if resume_from is not None:  # the earlier run's rows after the resume point are trained again
        from kintsugi.trainer.cli.resuming import resume_event
        coordinator.ledger.event(resume_event(args.run_dir, resume_from))
    if lead is not None:
        host = socket.gethostname() if args.host in ("0.0.0.0", "::") else args.host
        lead.publish(host, args.port)
    dashboard = _start_dashboard(job, args.run_dir, args.host, token, coordinator)
    if corpus is not None:
        log.info("job %r: %d x %d slots, waiting for workers at %s:%d (%s); run dir %s", job["name"],
                 job["parallel"]["replicas"], job["parallel"]["stages"], socket.gethostname(), args.port,
                 f"they need {P.TOKEN_ENV}" if token else "no token: any worker that reaches this port may join",
                 os.path.abspath(args.run_dir))
    try:
        rc = coordinator.serve()
    finally:
        if dashboard is not None:
            dashboard.close()
    if lead is not None:
        from kintsugi.recovery.runfiles import EX_DEPOSED
        if rc == EX_DEPOSED:
            _reexec_as_standby(coordinator.deposed or "deposed")
        lead.resign()
        if rc == EX_RESTART_STORE:  # saved; a standby (or this process, campaigning again) leads with a fresh store
            _reexec_as_standby("its store was flooded")
    elif rc == EX_RESTART_STORE:
        _restart_with_a_fresh_store(args)
    if args.outputs or not args.job:
        from kintsugi.trainer.config.job import JobConfig
        from kintsugi.trainer.reporting.summary import write_outputs
        try:
            summary = write_outputs(args.run_dir, JobConfig.from_dict(job), time.time() - t0)
        except Exception as e:  # noqa: BLE001 - the run itself is over and recorded in metrics.jsonl
            log.warning("could not write the run's outputs: %s", e)
        else:
            if summary is not None:
                log.info("done: final val loss %s, %d steps, %d failures, %d rebuilds -> %s",
                         summary["final_val_loss"], summary["steps"], summary["failures"],
                         len(summary["rebuilds"]), args.run_dir)
                if rc == 0 and summary.get("missing_steps"):
                    rc = EX_RECORD  # metrics.jsonl lacks committed steps: never a silent 0
    return rc


if __name__ == "__main__":
    sys.exit(main())
