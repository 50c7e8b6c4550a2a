"""The kernels switch in a real pipeline: two gloo stage processes train a tiny LLaMA for a few steps
through StageExecutor + Transport with compressed activations (int8) and gradients (fp8_e4m3), once
with the torch reference kernels and once with the Triton kernels under Triton's CPU interpreter
(`kernels.dispatch.configure("triton")`, what CUDA stages run compiled). Losses and the final
weights of both stages must be bit-identical; a run without compression must differ (so the codecs
really were on the wire), and the Triton run must really have called the Triton kernels."""
import json
import os
import subprocess
import sys

import pytest

from testkit import ROOT

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

SCRIPT = r'''
import hashlib, json, os, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp

def stage(rank, kernels, codec_a, codec_g, init, out):
    torch.set_num_threads(1)
    from kintsugi.kernels import dispatch
    dispatch.configure(kernels, "cpu")
    calls = {"triton": 0}
    if kernels == "triton":
        from kintsugi.kernels import triton_kernels as tk
        real_encode, real_decode = tk.encode, tk.decode
        def encode(*a, **k):
            calls["triton"] += 1
            return real_encode(*a, **k)
        def decode(*a, **k):
            calls["triton"] += 1
            return real_decode(*a, **k)
        tk.encode, tk.decode = encode, decode
    from kintsugi.compression.api import get_codec
    from kintsugi.parallel.schedules import StageExecutor, actions_for, routes_for
    from kintsugi.parallel.topology import per_stage_layers
    from kintsugi.parallel.transport import Transport
    from kintsugi.trainer.model.llama import Llama, ModelConfig, cross_entropy_loss
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    cfg = ModelConfig(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=32)
    model = Llama(cfg, per_stage_layers(4, 2)[rank], has_embedding=rank == 0, has_head=rank == 1, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    codecs = {}
    if codec_a != "none":
        codecs = {"p2p": get_codec(codec_a, 32), "p2p_grad": get_codec(codec_g, 32)}
    import threading
    t = Transport(None, abort=threading.Event(), codecs=codecs)
    ex = StageExecutor(model, rank, 2, t, lambda s: s, cfg.dim, cross_entropy_loss)
    routes = routes_for(2, 2, alternate=False)
    actions = actions_for("1f1b", rank, 2, routes)
    gen = torch.Generator().manual_seed(7)
    losses = []
    for step in range(3):
        ids = torch.randint(0, 64, (4, 17), generator=gen)
        loss = ex.run(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), routes, actions)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if loss is not None:
            losses.append(loss.hex())
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(p.detach().numpy().tobytes())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": losses, "weights": h.hexdigest(), "triton_calls": calls["triton"],
                   "active": dispatch.active_backend()["cpu"]}, f)
    dist.destroy_process_group()

if __name__ == "__main__":
    kernels, codec_a, codec_g, out = sys.argv[1:5]
    mp.start_processes(stage, args=(kernels, codec_a, codec_g, os.path.join(out, "init"), out), nprocs=2,
                       start_method="spawn", join=True)
    print(json.dumps([json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]))
'''


def _run(tmp_path, name, kernels, codec_a="int8", codec_g="fp8_e4m3", interpret=False):
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "pipeline_kernels.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    env.pop("KINTSUGI_KERNELS", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, str(script), kernels, codec_a, codec_g, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# the Triton interpreter is slow: under -m slow (scripts/gpu_check.sh runs the real kernels)
@pytest.mark.slow
def test_triton_interpreter_and_reference_train_bit_identically(tmp_path):
    pytest.importorskip("triton")
    ref = _run(tmp_path, "reference", "reference")
    tri = _run(tmp_path, "triton", "triton", interpret=True)
    plain = _run(tmp_path, "uncompressed", "reference", "none", "none")
    assert [r["active"] for r in ref] == ["reference"] * 2 and [r["active"] for r in tri] == ["triton"] * 2
    # Each stage encodes what it sends and decodes what it receives: 3 steps x 2 microbatches x
    # (1 encode + 1 decode) on either stage, all through the Triton kernels.
    assert all(r["triton_calls"] >= 12 for r in tri), tri
    assert all(r["triton_calls"] == 0 for r in ref)
    assert len(ref[1]["losses"]) == 3
    assert tri[1]["losses"] == ref[1]["losses"]
    assert [r["weights"] for r in tri] == [r["weights"] for r in ref]
    # The codecs were on the wire: without them the same run gives other numbers.
    assert plain[1]["losses"] != ref[1]["losses"] and plain[0]["weights"] != ref[0]["weights"]
