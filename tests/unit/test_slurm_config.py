"""launcher=slurm without a cluster: the configs compose, the scripts parse, the launcher builds the
right srun line and refuses to run outside an allocation with one line. The real cluster run is
tests/slow/test_slurm.py."""
import hashlib
import os
import subprocess
import sys

import pytest

from testkit import ROOT
from kintsugi.trainer.cli.compose import compose_job
from kintsugi.trainer.config.errors import ConfigError
from kintsugi.trainer.launch import slurm

SCRIPTS = os.path.join(ROOT, "scripts", "slurm")


@pytest.fixture
def no_slurm_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)


def test_launcher_slurm_composes():
    job, _ = compose_job(["launcher=slurm", "parallel.stages=2"])
    assert job.launcher.name == "slurm"
    assert slurm.tasks_needed(job) == 2 + job.faults.spares


def test_run_slurm_outside_an_allocation_fails_with_one_line(no_slurm_env, tmp_path):
    job, _ = compose_job(["launcher=slurm", "experiment=quick"])
    with pytest.raises(ConfigError) as e:
        slurm.run_slurm(job, str(tmp_path), {})
    msg = str(e.value)
    assert "\n" not in msg and "SLURM_JOB_ID" in msg and "launcher=local" in msg and "sbatch" in msg
    assert not os.listdir(tmp_path), "nothing is started or written before the check"


def test_allocation_too_small_names_the_ntasks_to_ask_for():
    job, _ = compose_job(["launcher=slurm", "parallel.stages=4", "faults.spares=1"])
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "PATH": os.environ["PATH"]}
    with pytest.raises(ConfigError, match=r"sbatch --ntasks=5"):
        slurm.check_allocation(job, env)


def test_srun_line_one_task_per_slot_and_spare():
    job, _ = compose_job(["launcher=slurm", "parallel.stages=2", "parallel.replicas=2", "faults.spares=1"])
    cmd = slurm.srun_command(job, "batchhost:1234", env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "5"})
    assert cmd[0] == "srun" and "--ntasks=5" in cmd and "--kill-on-bad-exit=0" in cmd and "--no-kill" in cmd
    assert "--gpus-per-task=1" not in cmd and "--overlap" not in cmd
    assert cmd[-4:] == ["kintsugi.trainer.launch.slurm", "worker", "--coordinator", "batchhost:1234"]


@pytest.mark.parametrize("env,gpus", [
    ({"SLURM_GPUS_ON_NODE": "4"}, True),
    ({"SLURM_JOB_GPUS": "0,1"}, True),
    ({"SLURM_GPUS_PER_TASK": "1"}, True),
    ({"SLURM_TRES_PER_TASK": "cpu:4"}, False),
    ({"SLURM_GPUS_ON_NODE": "0"}, False),
    ({}, False),
])
def test_gpus_per_task_only_with_gpus(env, gpus):
    job, _ = compose_job(["launcher=slurm", "parallel.stages=2"])
    cmd = slurm.srun_command(job, "h:1", env=dict(env, SLURM_JOB_ID="7"))
    assert ("--gpus-per-task=1" in cmd) == gpus


def test_srun_inside_a_step_overlaps_and_takes_extra_args():
    job, _ = compose_job(["launcher=slurm", "parallel.stages=2"])
    cmd = slurm.srun_command(job, "h:1", env={"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0",
                                              "KINTSUGI_SRUN_ARGS": "--cpus-per-task=8 --mem-per-cpu=2G"})
    assert "--overlap" in cmd and "--cpus-per-task=8" in cmd and "--mem-per-cpu=2G" in cmd


@pytest.mark.parametrize("nodes,standbys,placement", [
    ("4", 1, ["--relative=1", "--nodes=1"]),   # one standby, away from the batch host (node 0)
    ("3", 2, ["--relative=1", "--nodes=2"]),   # one per other node
    ("2", 3, ["--relative=1", "--nodes=1"]),   # more standbys than other nodes: they share node 1
    ("1", 1, ["--nodes=1"]),                   # nowhere else to go: beside the leader on the batch host
])
def test_standby_step_runs_on_the_other_nodes_beside_the_workers(nodes, standbys, placement, tmp_path):
    job, _ = compose_job(["launcher=slurm", "parallel.stages=2", "recovery.control=etcd",
                          f"recovery.standbys={standbys}"])
    cmd = slurm.standby_command(job, str(tmp_path), str(tmp_path / "job.json"),
                                env={"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": nodes})
    head = cmd[:cmd.index(sys.executable)]
    assert head == ["srun", "--overlap", f"--ntasks={standbys}", "--kill-on-bad-exit=0", "--no-kill",
                    "--job-name=kintsugi-standby"] + placement
    assert cmd[cmd.index(sys.executable) + 1:][:4] == ["-m", "kintsugi.trainer.launch.slurm", "standby", "--run-dir"]
    assert not any(a.startswith("--gpus") for a in cmd), "a standby coordinator needs no GPU"


def test_etcd_with_slurm_takes_standbys_and_derives_a_prefix_per_requeue(tmp_path, monkeypatch):
    job, _ = compose_job(["launcher=slurm", "recovery.control=etcd", "recovery.standbys=2"])
    assert job.recovery.standbys == 2 and job.recovery.etcd.prefix == ""
    # No cluster answers at this endpoint: prepare() fills the prefix first, then fails with one line.
    job.recovery.etcd.endpoints = ["http://127.0.0.1:1"]
    job.recovery.etcd.request_timeout_s = 0.5
    from kintsugi.trainer.launch.etcd_control import prepare
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    err = prepare(job, str(tmp_path))
    assert err and "\n" not in err
    digest = hashlib.sha1(os.path.realpath(tmp_path).encode()).hexdigest()[:12]  # the run dir's, as documented
    assert job.recovery.etcd.prefix == f"/kintsugi/{job.name}-r2-{digest}/"


def test_worker_ids_are_unique_per_task_and_requeue():
    a = slurm.worker_id({"SLURM_JOB_ID": "42", "SLURM_PROCID": "3"})
    b = slurm.worker_id({"SLURM_JOB_ID": "42", "SLURM_PROCID": "3", "SLURM_RESTART_COUNT": "1"})
    assert a == "slurm-42-r0-3" and b == "slurm-42-r1-3"


def test_sbatch_template_parses_and_wires_the_contract():
    path = os.path.join(SCRIPTS, "kintsugi.sbatch")
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    for needle in ("#SBATCH --signal=USR1@90", "#SBATCH --requeue", "launcher=slurm", "hydra.run.dir=$RUN_DIR",
                   "train.resume=$RUN_DIR", "scontrol requeue", "-eq 75", "trap '' USR1"):
        assert needle in text, needle


def test_local_cluster_script_parses():
    path = os.path.join(SCRIPTS, "local_cluster.sh")
    subprocess.run(["bash", "-n", path], check=True)
    assert os.access(path, os.X_OK)
    proc = subprocess.run([path], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_submitit_sweep_config_composes():
    job, cfg = compose_job(["hydra/launcher=kintsugi_slurm", "launcher=slurm", "parallel.stages=2"])
    lc = cfg.hydra.launcher
    assert lc._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert lc.use_srun is False and lc.tasks_per_node == 1
    assert lc.additional_parameters.ntasks_per_node == 2  # ${parallel.stages}
    assert lc.additional_parameters.signal == "USR1@90" and lc.additional_parameters.requeue is True
    assert any("scontrol requeue" in line for line in lc.teardown)


def test_submitit_writes_the_sbatch_script_we_mean(tmp_path):
    """The plugin's keys are all valid submitit parameters, and the sbatch file runs the Hydra job in
    the batch shell (no srun around it), warns the workers with USR1 and requeues on exit 75."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    submitit = pytest.importorskip("submitit")
    from omegaconf import OmegaConf
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    _, cfg = compose_job(["hydra/launcher=kintsugi_slurm", "launcher=slurm", "parallel.stages=2",
                          f"hydra.sweep.dir={tmp_path}"])
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    # What hydra_submitit_launcher's BaseSubmititLauncher.launch does with these keys:
    ex = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                               slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    ex.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    ex = ex._executor
    text = ex._make_submission_file_text("python -u -m submitit.core._submit X", "uid")
    assert "#SBATCH --signal=USR1@90" in text and "#SBATCH --requeue" in text
    assert "#SBATCH --ntasks-per-node=2" in text
    assert "\npython -u -m submitit.core._submit X" in text and "srun" not in text
    assert text.index("_submit X") < text.index("kintsugi_rc=$?") < text.index("scontrol requeue")
    assert ex._num_tasks() == 1


def test_a_notice_before_the_worker_is_ready_is_held_and_delivered(tmp_path):
    """Slurm's USR1 arriving while a worker task still imports torch must not kill it: it reaches the
    worker's handler once that is installed; a notice nobody handles falls back to the default."""
    import sys
    code = (
        "import os, signal, sys, time\n"
        "from kintsugi.trainer.launch.slurm import _hold_early_notices\n"
        "_hold_early_notices(wait_s=float(sys.argv[1]))\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "time.sleep(0.3)\n"
        "got = []\n"
        "signal.signal(signal.SIGUSR1, lambda *_: got.append(1))\n"
        "time.sleep(0.5)\n"
        "print('handled' if got else 'lost')\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"  # nobody handles TERM: default action after wait_s
        "time.sleep(5)\n"
        "print('still alive')\n")
    proc = subprocess.run([sys.executable, "-c", code, "1.0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.split() == ["handled"], proc.stdout + proc.stderr
    assert proc.returncode == -15
