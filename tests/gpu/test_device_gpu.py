"""The CUDA-only lines on a real GPU (skipped without CUDA): device binding, pinned staging ordered
after the producing kernel, the gloo-staged transport and quantized all-reduce between two processes
on one GPU (Triton kernels, bitwise equal to the torch reference on CPU), a 2-stage pipeline on the
GPU against the same pipeline on CPU, NCCL's refusal of two ranks on one GPU, an NCCL group against
a SIGKILLed peer (2+ GPUs), and a CUDA package loaded in a process that sees no GPU."""
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.timeout(300)]
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2,
                              reason="one GPU cannot host two ranks of one NCCL communicator")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def test_workers_bind_the_gpu_their_launcher_assigns():
    from kintsugi.parallel import device
    n = torch.cuda.device_count()
    assert device.resolve("auto") == "cuda"
    d = device.bind_worker("auto", "local", {}, worker_index=n)  # round robin wraps to the first GPU
    assert d == torch.device("cuda", 0) and torch.cuda.current_device() == 0
    assert torch.ones(2, device="cuda").device == d
    if n >= 2:
        try:
            assert device.bind_worker("cuda", "torchrun", {"LOCAL_RANK": "1"}) == torch.device("cuda", 1)
            assert torch.cuda.current_device() == 1
        finally:
            torch.cuda.set_device(0)


def test_pinned_staging_round_trip_waits_for_the_producer():
    from kintsugi.parallel.device import HostStager
    st = HostStager(torch.device("cuda", 0))
    a = torch.randn(4096, 4096, device="cuda")
    y = a @ a  # still running when the copy is queued: the side stream must wait for it
    host, event = st.to_host(y)
    event.synchronize()
    assert host.is_pinned() and torch.equal(host, y.cpu())
    back = st.to_device(host)  # the current stream waits for the copy; no host synchronisation
    assert back.device.type == "cuda" and torch.equal(back, y)
    torch.cuda.synchronize()
    again = st.host_buffer(host.numel(), host.dtype)  # the copy is done: the buffer is handed out again
    assert again.data_ptr() == host.data_ptr() and st.allocated == 1


def _staged_pair(rank, init, out):
    torch.set_num_threads(1)
    torch.cuda.set_device(0)  # both ranks share one GPU: gloo (staged) allows it
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    from kintsugi.compression.api import all_reduce, get_codec
    from kintsugi.parallel.transport import Transport
    t = Transport(None, abort=threading.Event(), codecs={"p2p": get_codec("int8", 256)}, device=torch.device("cuda", 0))
    x = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    if rank == 0:
        t.send(x.cuda(), 1, 1)                          # int8, encoded by Triton on the GPU
        t.send(x.cuda() * 3, 1, 2, channel="p2p_grad")  # fp32 through pinned host memory
        t.flush()
    else:
        a = t.recv((64, 1000), 0, 1)
        b = t.recv((64, 1000), 0, 2, channel="p2p_grad")
        torch.save({"a": a.cpu(), "b": b.cpu(), "device": str(a.device)}, os.path.join(out, "recv.pt"))
    # The quantized all-reduce of CUDA tensors over gloo, then the same on CPU (torch reference).
    mine = torch.randn(5000, generator=torch.Generator().manual_seed(10 + rank))
    on_gpu = mine.cuda()
    all_reduce([on_gpu], get_codec("int8", 256), algorithm="two_shot")
    on_cpu = mine.clone()
    all_reduce([on_cpu], get_codec("int8", 256), algorithm="two_shot")
    torch.save({"gpu": on_gpu.cpu(), "cpu": on_cpu}, os.path.join(out, f"allreduce{rank}.pt"))
    dist.destroy_process_group()


def test_staged_transport_and_allreduce_between_two_processes_on_one_gpu(tmp_path):
    from kintsugi.kernels import reference
    from kintsugi.kernels.spec import SPECS
    mp.start_processes(_staged_pair, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    got = torch.load(tmp_path / "recv.pt")
    x = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    payload = reference.encode(SPECS["int8"], x.reshape(1, -1), 256)
    expected = reference.decode(SPECS["int8"], payload, x.numel(), 256).view(64, 1000)
    assert got["device"].startswith("cuda")
    assert torch.equal(got["a"], expected)  # Triton on the GPU == the torch reference on the CPU, bitwise
    assert torch.equal(got["b"], x * 3)
    for r in range(2):
        res = torch.load(tmp_path / f"allreduce{r}.pt")
        assert torch.equal(res["gpu"], res["cpu"])


def _pipeline_stage(rank, device_type, init, out):
    torch.set_num_threads(1)
    if device_type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    from kintsugi.parallel.schedules import StageExecutor, actions_for, routes_for
    from kintsugi.parallel.topology import per_stage_layers
    from kintsugi.parallel.transport import Transport
    from kintsugi.trainer.model.llama import Llama, ModelConfig, cross_entropy_loss
    dev = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
    cfg = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64)
    model = Llama(cfg, per_stage_layers(4, 2)[rank], has_embedding=rank == 0, has_head=rank == 1, seed=0).to(dev)
    t = Transport(None, abort=threading.Event(), device=dev)
    ex = StageExecutor(model, rank, 2, t, lambda s: s, cfg.dim, cross_entropy_loss, device_type=device_type)
    ids = torch.randint(0, 128, (8, 33), generator=torch.Generator().manual_seed(3)).to(dev)
    routes = routes_for(2, 4, alternate=False)
    loss = ex.run(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), routes, actions_for("1f1b", rank, 2, routes))
    grads = {n: p.grad.cpu() for n, p in model.named_parameters()}
    torch.save({"loss": loss, "grads": grads}, os.path.join(out, f"{device_type}{rank}.pt"))
    dist.destroy_process_group()


def test_a_pipeline_on_the_gpu_computes_what_it_computes_on_cpu(tmp_path):
    for device_type in ("cpu", "cuda"):
        mp.start_processes(_pipeline_stage, args=(device_type, str(tmp_path / f"init_{device_type}"), str(tmp_path)),
                           nprocs=2, start_method="spawn")
    cpu_loss = torch.load(tmp_path / "cpu1.pt")["loss"]
    gpu_loss = torch.load(tmp_path / "cuda1.pt")["loss"]
    assert abs(gpu_loss - cpu_loss) / cpu_loss < 1e-4, (gpu_loss, cpu_loss)
    for r in range(2):
        cpu, gpu = torch.load(tmp_path / f"cpu{r}.pt")["grads"], torch.load(tmp_path / f"cuda{r}.pt")["grads"]
        for name in cpu:
            torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-3, atol=1e-5, msg=name)


def test_nccl_refuses_two_ranks_on_one_gpu():
    import socket
    from datetime import timedelta
    from kintsugi.parallel.groups import form_group
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, use_libuv=True)
    connect = lambda: dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,  # noqa: E731
                                    use_libuv=True, timeout=timedelta(seconds=30))
    errors = {}

    def form(rank):
        try:
            form_group(connect, "dup/0", rank, 2, 30.0, backend="nccl", device=torch.device("cuda", 0))
        except Exception as e:  # noqa: BLE001 - what each rank raised is the observation
            errors[rank] = e
    threads = [threading.Thread(target=form, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    del master
    assert set(errors) == {0, 1}
    for e in errors.values():
        assert isinstance(e, ValueError) and "ranks [0, 1] share GPU" in str(e) and "\n" not in str(e)


NCCL_RANK = r'''
import json, os, sys, threading, time, torch, torch.distributed as dist
from datetime import timedelta
from kintsugi.parallel.groups import form_group
from kintsugi.parallel.transport import PeerFailure, Transport
from kintsugi.parallel import device
rank, port = int(sys.argv[1]), int(sys.argv[2])
dev = device.bind("cuda", rank)
connect = lambda: dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False, use_libuv=True,
                                timeout=timedelta(seconds=60))
store = connect()
group = form_group(connect, "nccl/0", rank, 2, 60.0, backend="nccl", device=dev)
t = Transport(group, abort=threading.Event(), device=dev, data_group=group, deadline_s=3.0)
if rank == 1:
    t.send(torch.arange(1000.0, device=dev), 0, 1)
    t.flush()
    store.set("sent", "1")
    time.sleep(600)  # the test SIGKILLs this process
out = {}
x = t.recv((1000,), 1, 1)
t.flush()
out["first_ok"] = bool(torch.equal(x.cpu(), torch.arange(1000.0)))
out["memory_before"] = device.memory_in_use(dev)
store.set("received", "1")
store.wait(["killed"], timedelta(seconds=60))
t0 = time.monotonic()
try:
    t.recv((1000,), 1, 2)  # the dead peer never sends: NCCL waits in CUDA until the deadline aborts it
    t.flush()
    out["raised"] = None
except PeerFailure as e:
    out["raised"], out["peer"] = "PeerFailure", e.peer
out["raised_after_s"] = time.monotonic() - t0
group.abort_thread.join(60)
out["abort_returned"] = not group.abort_thread.is_alive()
synced = threading.Event()
threading.Thread(target=lambda: (torch.cuda.synchronize(), synced.set()), daemon=True).start()
out["stream_released"] = synced.wait(30)  # the aborted communicator no longer holds the GPU stream
try:
    group.isend(torch.zeros(1, device=dev), 1, 3)
    out["reused"] = True
except RuntimeError as e:
    out["reused"], out["refusal"] = False, str(e)
out["memory_after"] = device.memory_in_use(dev)
print(json.dumps(out), flush=True)
os._exit(0)
'''


@TWO_GPUS
def test_an_nccl_group_survives_a_killed_peer_by_its_deadline_and_is_never_reused(tmp_path):
    import signal
    import socket
    from datetime import timedelta
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, use_libuv=True)
    procs = [subprocess.Popen([sys.executable, "-c", NCCL_RANK, str(r), str(port)], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL, text=True) for r in range(2)]
    try:
        master.wait(["sent", "received"], timedelta(seconds=120))
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(10)
        master.set("killed", "1")
        stdout, _ = procs[0].communicate(timeout=180)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 0, stdout  # the survivor lived: torch's watchdog did not take it down
    res = json.loads(stdout.strip().splitlines()[-1])
    assert res["first_ok"]
    assert res["raised"] == "PeerFailure" and res["peer"] == 1
    assert 3.0 <= res["raised_after_s"] < 15.0, res  # its own 3 s deadline, not torch's 10 min default
    assert res["abort_returned"] and res["stream_released"]
    assert res["reused"] is False and "never reused" in res["refusal"]
    print(json.dumps({"nccl_abort": res}))
    del master


def test_a_cuda_package_loads_in_a_process_that_sees_no_gpu(tmp_path):
    state = {"w": torch.randn(64, 32, device="cuda"), "opt": {"exp_avg": torch.randn(64, device="cuda")},
             "bf": torch.randn(8, device="cuda", dtype=torch.bfloat16), "step": 7}
    path = tmp_path / "stage.pt"
    torch.save(state, path)
    code = ("import sys, torch; from kintsugi.parallel.device import load_cpu; "
            "assert not torch.cuda.is_available(); s = load_cpu(sys.argv[1]); "
            "torch.save({'devices': sorted({t.device.type for t in (s['w'], s['opt']['exp_avg'], s['bf'])}), **s}, sys.argv[2])")
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "back.pt")], cwd=ROOT,
                          env=dict(_env(), CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    back = torch.load(tmp_path / "back.pt")
    assert back["devices"] == ["cpu"] and back["step"] == 7
    for key in ("w", "bf"):
        assert torch.equal(back[key], state[key].cpu())
    assert torch.equal(back["opt"]["exp_avg"], state["opt"]["exp_avg"].cpu())
