"""`kintsugi export / report / join` without starting a run: run directories are written by hand
(the files a run leaves: job.json, metrics.jsonl, summary.json, final/stage<s>.safetensors), and
every user mistake must end as one line with exit code 2."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from kintsugi.trainer.cli import commands
from kintsugi.trainer.cli.main import main as cli_main
from kintsugi.trainer.config.job import JobConfig
from kintsugi.trainer.model.llama import Llama, ModelConfig
from kintsugi.trainer.reporting.report import failure_marks, load_run, plot_runs, short_names, write_report

MiB = 2**20


def _write_run(path, name, steps, rebuilds=(), replicas=1, bytes_=None, summary=True, val=3.0):
    """A run directory as the coordinator and trainer.reporting.summary leave it (loss falls 0.1 per step)."""
    os.makedirs(path)
    lines = []
    for step in range(steps):
        for r in range(replicas):
            lines.append({"replica": r, "step": step, "loss": 5.0 - 0.1 * step + 0.01 * r, "grad_norm": 1.0,
                          "tokens": 2048, "lr": 1e-3, "step_s": 0.5, "batch_ids": [], "wall_s": 1.0 + step, "gen": 0})
    lines.append({"step": steps, "val_loss": val, "final": True, "wall_s": steps + 1.5})
    for rb in rebuilds:
        lines.append({"event": dict(rb, kind="rebuild", detect_s=0.01)})
    lines.append({"event": {"kind": "join_refused", "wid": "x", "host": "h", "t": 2.0}})  # not a failure
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(l) + "\n" for l in lines))
    if summary:
        b = {"p2p": 0, "p2p_activations": 14 * MiB, "p2p_gradients": 12 * MiB, "outer_sync": 0, "data_parallel": 0,
             "rebuild": 0, "data_parallel_equivalent": 0}
        b.update(bytes_ or {})
        with open(os.path.join(path, "summary.json"), "w") as f:
            json.dump({"final_val_loss": val, "steps": steps, "tokens": 2048 * steps * replicas, "wall_s": steps + 2.0,
                       "tokens_per_s": 1234.0, "failures": len(rebuilds), "error": None,
                       "rebuilds": [{k: rb[k] for k in ("step", "slot", "tier", "recover_s")} for rb in rebuilds],
                       "bytes": b, "config": {"name": name}}, f)
    return str(path)


@pytest.fixture
def two_runs(tmp_path):
    tiered = _write_run(tmp_path / "tiered" / "2026-01-01_00-00-00", "tiered", 10, rebuilds=[
        {"step": 3, "slot": [0, 1], "tier": "checkfree", "recover_s": 1.5, "t": 5.0},
        {"step": 6, "slot": [0, 0], "tier": "checkfree_plus", "recover_s": 0.5, "t": 8.0}],
        bytes_={"rebuild": 3 * MiB})
    diloco = _write_run(tmp_path / "diloco" / "2026-01-01_00-00-00", "diloco", 8, replicas=2,
                        bytes_={"outer_sync": 5 * MiB, "data_parallel_equivalent": 700 * MiB}, val=3.25)
    return tiered, diloco


def test_report_table_compares_runs(two_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli_main(["report", *two_runs, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    runs_table, bytes_table = text.split("\n\n")[:2]
    rows = {line.split()[0]: line for line in runs_table.splitlines()[2:]}
    tiered, diloco = rows["tiered/2026-01-01_00-00-00"], rows["diloco/2026-01-01_00-00-00"]
    assert "3.0000" in tiered and "3.2500" in diloco
    assert " 10 " in tiered and " 8 " in diloco
    assert "checkfree x1, checkfree_plus x1" in tiered and diloco.rstrip().endswith("none")
    header, _, tiered_bytes, diloco_bytes = bytes_table.splitlines()
    assert header.split()[:3] == ["bytes", "sent", "p2p"]
    assert tiered_bytes.split()[1:3] == ["14.0", "MiB"] and "3.0 MiB" in tiered_bytes
    assert "5.0 MiB" in diloco_bytes and diloco_bytes.endswith("700.0 MiB")
    assert (out / "report.txt").read_text().strip() in text
    with open(out / "report.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_failures_are_marked_at_failure_time_with_their_tier(two_runs, tmp_path):
    run = load_run(two_runs[0])
    run.name = "tiered"
    # The event is logged when the rebuilt stage trains again; the failure was recover_s earlier.
    assert failure_marks(run) == [(3.5, 5.0, "checkfree r0s1"), (7.5, 8.0, "checkfree_plus r0s0")]
    labels = plot_runs([run, load_run(two_runs[1])], str(tmp_path / "fig.png"))
    assert labels == ["checkfree r0s1", "checkfree_plus r0s0"]
    assert os.path.getsize(tmp_path / "fig.png") > 10_000


def test_report_of_a_run_without_summary(tmp_path):
    stopped = _write_run(tmp_path / "stopped", "stopped", 4, summary=False, rebuilds=[
        {"step": 2, "slot": [0, 1], "tier": "checkfree", "recover_s": 0.2, "t": 3.0}])
    table, png = write_report([stopped], str(tmp_path / "out"))
    row = table.splitlines()[2]
    assert row.split()[:3] == ["stopped", "4", "3.0000"] and "checkfree x1" in row
    assert os.path.isfile(png)


def test_short_names_keep_the_run_name_and_stay_unique():
    assert short_names(["/o/quick/2026-01-01_00", "/o/big/2026-01-01_00"]) == ["quick/2026-01-01_00", "big/2026-01-01_00"]
    assert short_names(["/a/x/run", "/b/x/run"]) == ["a/x/run", "b/x/run"]
    assert short_names(["/tmp/one", "/tmp/two"]) == ["one", "two"]


@pytest.mark.parametrize("argv,needle", [
    (["report"], "the following arguments are required: runs"),
    (["report", "/no/such/run"], "/no/such/run: no such run directory"),
    (["export", "/no/such/run", "/tmp/x"], "/no/such/run: no such run directory"),
    (["export", "only-one-arg"], "required: out_dir"),
    (["join"], "required: --coordinator"),
    (["join", "--coordinator", "nohost"], "is not host:port"),
    (["join", "--coordinator", "h:1", "--workers", "0"], "--workers=0 must be >= 1"),
    (["join", "--coordinator", "h:1", "--workers", "two"], "invalid int value"),
])
def test_argument_errors_are_one_line(argv, needle, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith(f"kintsugi {argv[0]}: ") and err.count("\n") == 1


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "not a Kintsugi run directory" in capsys.readouterr().err


# ---- export on a hand-written run: stage slices of one seeded model ------------------------------

CFG = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16, rope_theta=5e5)


def _write_final(run_dir, stages, model=CFG, data=None):
    """job.json + final/stage<s>.safetensors as replica 0 writes them. Parameters are seeded by name,
    so a stage built alone is bitwise the slice of the full model built with the same seed."""
    from safetensors.torch import save_file
    from kintsugi.trainer.config.job import ParallelConfig
    from kintsugi.trainer.data.corpus import DataConfig
    from kintsugi.trainer.runtime.stage import StageState

    job = JobConfig(model=model, parallel=ParallelConfig(stages=stages), data=data or DataConfig(seq_len=16))
    os.makedirs(os.path.join(run_dir, "final"))
    with open(os.path.join(run_dir, "job.json"), "w") as f:
        json.dump(job.to_dict(), f)
    for s in range(stages):
        sd = StageState(job, s).model.state_dict()
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(run_dir, "final", f"stage{s}.safetensors"))
    return Llama(model, seed=job.train.seed).eval()


def test_export_assembles_stages_into_a_transformers_model(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    run, out = str(tmp_path / "run"), str(tmp_path / "hf")
    full = _write_final(run, stages=3)
    assert cli_main(["export", run, out]) == 0
    assert "byte-level" in (tmp_path / "hf" / "README.txt").read_text()
    assert sorted(os.listdir(out)) == ["README.txt", "config.json", "model.safetensors"]
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.eos_token_id == 0 and hf.config.bos_token_id is None  # the byte tokenizer's end of text
    ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, full(ids), atol=1e-5, rtol=1e-5)
    # The export is also a valid model.init_from (fine-tuning / continuing from it): stage by stage.
    from kintsugi.trainer.model.pretrained import checkpoint_model_config, load_into_stage
    from kintsugi.trainer.runtime.stage import StageState
    job = JobConfig.from_dict(json.load(open(os.path.join(run, "job.json"))))
    assert checkpoint_model_config(out, ModelConfig()).rope_theta == CFG.rope_theta
    for s in range(3):
        stage = StageState(job, s, seed_offset=1)  # other random values until loaded
        load_into_stage(stage, out)
        for k, v in stage.model.state_dict().items():
            assert torch.equal(v, full.state_dict()[k]), k
    # A second export into the same directory must not overwrite it silently.
    assert cli_main(["export", run, out]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["export", run, out, "--force"]) == 0


def test_export_copies_a_bpe_tokenizer_from_the_token_cache(tmp_path):
    transformers = pytest.importorskip("transformers")
    from kintsugi.trainer.data.corpus import DataConfig, prepare_corpus

    (tmp_path / "corpus").mkdir()
    for d in range(8):  # documents are files; a few so that one can be held out
        (tmp_path / "corpus" / f"doc{d}.txt").write_text(
            "".join(f"def f{i}(x):\n    return x * {i} + {d}\n" for i in range(40)))
    data = DataConfig(source="files", paths=[str(tmp_path / "corpus")], tokenizer="bpe", bpe_vocab_size=300,
                      seq_len=16, val_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    corpus = prepare_corpus(data)
    run, out = str(tmp_path / "run"), str(tmp_path / "hf")
    _write_final(run, stages=2, model=ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                                  vocab_size=corpus.vocab_size, max_seq_len=16), data=data)
    assert cli_main(["export", run, out]) == 0
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token_id == corpus.eot_id
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["eos_token_id"] == corpus.eot_id
    assert "BPE (300 tokens) copied" in (tmp_path / "hf" / "README.txt").read_text()


def test_export_names_the_missing_stage(tmp_path, capsys):
    run = str(tmp_path / "run")
    _write_final(run, stages=3)
    os.remove(os.path.join(run, "final", "stage1.safetensors"))
    assert cli_main(["export", run, str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "final/stage1.safetensors is missing" in err and "did not finish" in err
    assert not os.path.exists(tmp_path / "hf")


def test_export_refuses_weights_of_another_model(tmp_path, capsys):
    run = str(tmp_path / "run")
    _write_final(run, stages=1)
    with open(os.path.join(run, "job.json")) as f:
        job = json.load(f)
    job["model"]["dim"] = 64
    with open(os.path.join(run, "job.json"), "w") as f:
        json.dump(job, f)
    assert cli_main(["export", run, str(tmp_path / "hf")]) == 2
    assert "does not match the model in job.json" in capsys.readouterr().err


# ---- join -----------------------------------------------------------------------------------------

def test_join_starts_one_worker_per_device_and_waits(monkeypatch, capsys):
    started = []

    class FakeWorker:
        def __init__(self, cmd, env):
            started.append((cmd, env))
            self.pid = 1000 + len(started)

        def poll(self):
            return 0

        def wait(self):
            return 0

    monkeypatch.setattr(commands.subprocess, "Popen", FakeWorker)
    monkeypatch.setattr(commands, "_cuda_devices", lambda: ["3", "5"])
    monkeypatch.setenv("KINTSUGI_TOKEN", "secret")
    assert cli_main(["join", "--coordinator", "10.0.0.1:29400"]) == 0
    assert [c for c, _ in started] == [[sys.executable, "-m", "kintsugi.trainer.runtime.worker", "--coordinator", "10.0.0.1:29400"]] * 2
    assert [e["CUDA_VISIBLE_DEVICES"] for _, e in started] == ["3", "5"]
    assert all(e["KINTSUGI_TOKEN"] == "secret" and e["KINTSUGI_PDEATHSIG"] == "1" for _, e in started)
    assert "2 worker(s) offered to 10.0.0.1:29400" in capsys.readouterr().err

    started.clear()
    monkeypatch.setattr(commands, "_cuda_devices", lambda: [])
    monkeypatch.delenv("KINTSUGI_TOKEN")
    assert cli_main(["join", "--coordinator", "h:1", "--workers", "3"]) == 0
    assert len(started) == 3 and all("CUDA_VISIBLE_DEVICES" not in e or e["CUDA_VISIBLE_DEVICES"] ==
                                     os.environ.get("CUDA_VISIBLE_DEVICES") for _, e in started)
    assert "KINTSUGI_TOKEN is not set" in capsys.readouterr().err


def test_join_passes_a_preemption_notice_on_to_its_workers(tmp_path):
    """SIGTERM to `kintsugi join` reaches the workers (so they hand their state over); the exit code
    is the workers'."""
    ready = tmp_path / "ready"
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
             f"open({str(ready)!r}, 'w').close()\n"
             "time.sleep(30)\n")
    procs = [subprocess.Popen([sys.executable, "-c", child])]
    original = signal.getsignal(signal.SIGTERM)

    def notice():
        deadline = time.time() + 20
        # Both sides ready: the child's handler (it wrote the file) and wait_workers' forwarder.
        while time.time() < deadline:
            if ready.exists() and signal.getsignal(signal.SIGTERM) is not original:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)
        procs[0].kill()  # never signal pytest itself without the forwarder installed

    threading.Thread(target=notice, daemon=True).start()
    t0 = time.time()
    assert commands.wait_workers(procs) == 7
    assert time.time() - t0 < 15
    assert signal.getsignal(signal.SIGTERM) is original


@pytest.mark.slow
@pytest.mark.distributed
def test_join_fills_the_slots_of_a_running_job(tmp_path):
    """End to end (out of the default run for time): a coordinator waiting for workers, and
    `kintsugi join --workers 2` with the job's token supplies both; the run finishes and join exits 0.
    With the wrong token the workers are refused and join reports it."""
    from testkit import ROOT
    from kintsugi.recovery import control as C
    from kintsugi.recovery import protocol as P
    from kintsugi.trainer.cli.compose import compose_job
    from kintsugi.trainer.data.corpus import prepare_corpus
    from kintsugi.trainer.launch.local import child_env

    job, _ = compose_job(["experiment=quick", "faults=none", "parallel.stages=2", "train.max_steps=2"])
    corpus = prepare_corpus(job.data)
    job.model.vocab_size, job.recovery.token = corpus.vocab_size, "s3cret"
    results = {}
    for token in ("wrong", "s3cret"):
        run = tmp_path / token
        run.mkdir()
        (run / "job.json").write_text(json.dumps(job.to_dict()))
        port = P.free_port()
        coordinator = subprocess.Popen([sys.executable, "-m", "kintsugi.trainer.cli.coordinator", "--port", str(port), "--host",
                                        "127.0.0.1", "--run-dir", str(run), "--job", str(run / "job.json"),
                                        "--no-progress"], env=child_env(), cwd=ROOT)
        try:
            # The corpus as a launcher publishes it: sealed with the run's token (workers refuse anything else).
            launcher = C.open_control("127.0.0.1", port, "s3cret", role="launcher", timeout_s=60)
            launcher.put_json("corpus", {"train_path": corpus.train_path, "val_path": corpus.val_path,
                                         "dtype": str(corpus.dtype), "vocab_size": corpus.vocab_size})
            join = subprocess.run([sys.executable, "-m", "trainer", "join", "--coordinator", f"127.0.0.1:{port}",
                                   "--workers", "2"], env=child_env({"KINTSUGI_TOKEN": token}), cwd=ROOT,
                                  capture_output=True, text=True, timeout=180)
            results[token] = join
        finally:
            if coordinator.poll() is None:
                coordinator.terminate()
            coordinator.wait(timeout=30)
    # A wrong token is caught at the coordinator's identity, before any join: one line naming the token.
    assert results["wrong"].returncode != 0 and "KINTSUGI_TOKEN" in results["wrong"].stderr, results["wrong"].stderr
    assert results["s3cret"].returncode == 0, results["s3cret"].stderr[-2000:]
    state = json.loads((tmp_path / "s3cret" / "coordinator_state.json").read_text())
    assert state["committed"] == {"0": 1} and state["error"] is None
    assert sorted(os.listdir(tmp_path / "s3cret" / "final")) == ["stage0.safetensors", "stage1.safetensors"]
