"""The subcommands beside training: `kintsugi export`, `kintsugi report` and `kintsugi join`.

`trainer.cli.main` hands them `argv` (subcommand first). Each parses its own arguments and returns
an exit code. A user mistake (a missing run directory, a run without final weights, a bad address)
ends as one line on stderr naming the fix and exit code 2, never a traceback.

- export: the per-stage final weights of a finished run -> one Hugging Face Llama directory
  (`model.safetensors` + `config.json`, plus the tokenizer when the run had one).
- report: delegates the table and the figure to `trainer.reporting.report`.
- join: starts `python -m trainer.runtime.worker` once per local device so this machine becomes a spare of
  a running job; the worker does the joining, this only starts, forwards signals and waits.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple
from kintsugi.recovery.runfiles import JOB, SUMMARY

if TYPE_CHECKING:
    import torch

# Files of a Hugging Face tokenizer directory worth copying (never its weights).
_TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                    "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")


class CommandError(Exception):
    """A user mistake; its message is one line that says what to do instead."""


class _Parser(argparse.ArgumentParser):
    # argparse would print the usage and exit; one line through dispatch() reads like every other
    # kintsugi error and lets tests check it without catching SystemExit.
    def error(self, message):
        raise CommandError(f"{message} (see `{self.prog} --help`)")


def coordinator_command(argv) -> int:
    """`kintsugi coordinator --port P --run-dir D -- <overrides>`: the coordinator on a stable host."""
    from kintsugi.trainer.cli.coordinator import main
    return main(argv)


def dispatch(argv: List[str]) -> int:
    name, rest = argv[0], list(argv[1:])
    commands = {"export": export_command, "report": report_command, "join": join_command,
                "coordinator": coordinator_command}
    try:
        return commands[name](rest)
    except CommandError as e:
        print(f"kintsugi {name}: {e}", file=sys.stderr)
        return 2


# ---- export -------------------------------------------------------------------------------------

def export_command(argv: List[str]) -> int:
    ap = _Parser(prog="kintsugi export", description="Write a finished run's final model as a Hugging Face "
                 "Llama directory that transformers.LlamaForCausalLM.from_pretrained loads.")
    ap.add_argument("run_dir", help="a finished run: outputs/<name>/<time>")
    ap.add_argument("out_dir", help="directory to write (created; must be empty unless --force)")
    ap.add_argument("--force", action="store_true", help="write into a non-empty out_dir")
    ap.add_argument("--verify", action="store_true",
                    help="load the result with transformers and compare its logits with Kintsugi's model")
    args = ap.parse_args(argv)
    info = export_run(args.run_dir, args.out_dir, force=args.force)
    print(f"kintsugi export: {info['num_params']:,} parameters ({info['n_layers']} layers from "
          f"{info['num_stages']} stages, step {info['steps']}) -> {args.out_dir}; tokenizer: {info['tokenizer']}")
    if args.verify:
        diff = verify_export(args.out_dir)
        print(f"kintsugi export: transformers logits match ours, max |diff| {diff:.2e}")
        if diff > 1e-4:
            print("kintsugi export: logits differ by more than 1e-4; the export is wrong", file=sys.stderr)
            return 1
    return 0


def load_job(run_dir: str):
    """The JobConfig a run was trained with (job.json, written by the launcher)."""
    from kintsugi.trainer.config.job import JobConfig

    if not os.path.isdir(run_dir):
        raise CommandError(f"{run_dir}: no such run directory; pass a run's outputs/<name>/<time> directory")
    path = os.path.join(run_dir, JOB)
    if not os.path.isfile(path):
        raise CommandError(f"{run_dir}: no job.json, so not a Kintsugi run directory; pass outputs/<name>/<time>")
    with open(path) as f:
        return JobConfig.from_dict(json.load(f))


def final_state_dict(run_dir: str, job) -> Dict[str, "torch.Tensor"]:
    """Replica 0's final weights of every stage merged into the full model's state dict (our names),
    checked name by name and shape by shape against the architecture in job.json."""
    import torch
    from safetensors.torch import load_file

    from kintsugi.trainer.model.llama import Llama

    S = job.parallel.stages
    paths = [os.path.join(run_dir, "final", f"stage{s}.safetensors") for s in range(S)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise CommandError(f"{missing[0]} is missing ({len(missing)} of {S} stages): the run did not finish; "
                           "replica 0 writes each stage's final weights only when train.max_steps is reached")
    sd: Dict[str, torch.Tensor] = {}
    for path in paths:
        part = load_file(path)
        if set(part) & set(sd):
            raise CommandError(f"{path} repeats parameters of another stage; the final/ directory mixes runs")
        sd.update(part)
    with torch.device("meta"):  # names and shapes without allocating or initialising anything
        want = {k: tuple(v.shape) for k, v in Llama(job.model).state_dict().items()}
    absent = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    wrong = sorted(k for k in set(want) & set(sd) if tuple(sd[k].shape) != want[k])
    if absent or extra or wrong:
        raise CommandError(f"{run_dir}/final does not match the model in job.json (missing {absent[:2]}, "
                           f"unexpected {extra[:2]}, wrong shape {wrong[:2]}); was final/ written by another run?")
    return sd


def export_run(run_dir: str, out_dir: str, force: bool = False) -> dict:
    """Write `out_dir` (model.safetensors under LlamaForCausalLM names, config.json, tokenizer files,
    README.txt). Returns what was written, for the one-line summary."""
    from safetensors.torch import save_file

    from kintsugi.trainer.model.llama import to_hf_state_dict

    job = load_job(run_dir)
    sd = final_state_dict(run_dir, job)
    try:
        from kintsugi.trainer.model.llama import hf_config
        hf = hf_config(job.model)
    except ImportError:
        raise CommandError("writing config.json needs transformers; pip install 'kintsugi-train[hf]'") from None
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise CommandError(f"{out_dir} exists and is not empty; choose a new directory or pass --force")
    os.makedirs(out_dir, exist_ok=True)
    tok_dir, eot_id, tok_note = find_tokenizer(job)

    hf_sd = {k: v.contiguous() for k, v in to_hf_state_dict(sd, job.model).items()}
    save_file(hf_sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    dtype = next(iter(sd.values())).dtype
    hf.architectures = ["LlamaForCausalLM"]
    # LlamaConfig's defaults (bos 1, eos 2) are Llama 2's ids; ours come from the run's tokenizer.
    hf.bos_token_id, hf.eos_token_id, hf.pad_token_id = None, eot_id, None
    setattr(hf, "dtype" if hasattr(hf, "dtype") else "torch_dtype", dtype)
    hf.save_pretrained(out_dir)

    copied = []
    if tok_dir is not None:
        for name in sorted(os.listdir(tok_dir)):
            is_file = os.path.isfile(os.path.join(tok_dir, name))
            if is_file and (name.startswith("tokenizer") or name in _TOKENIZER_FILES):
                shutil.copy2(os.path.join(tok_dir, name), os.path.join(out_dir, name))
                copied.append(name)
    summary = _read_json(os.path.join(run_dir, SUMMARY)) or {}
    steps = summary.get("steps", job.train.max_steps)
    _write_readme(out_dir, run_dir, job, steps, summary.get("final_val_loss"), tok_note, copied)
    return {"num_params": sum(v.numel() for v in sd.values()), "n_layers": job.model.n_layers,
            "num_stages": job.parallel.stages, "steps": steps, "tokenizer": tok_note, "tokenizer_files": copied}


def find_tokenizer(job) -> Tuple[Optional[str], Optional[int], str]:
    """(directory to copy the tokenizer from or None, end-of-text id or None, a note for the user).

    A BPE tokenizer is trained into the run's token cache (`data.cache_dir/<key>/tokenizer`) and the
    run directory does not record the key, so it is found by the data settings stored in each cache's
    meta.json; a tokenizer directory given as data.tokenizer is used as is."""
    data = job.data
    if data.tokenizer == "byte":
        return None, 0, "byte-level (token id = UTF-8 byte, 0 = end of text); no tokenizer files needed"
    meta = _cache_meta(data)
    eot = meta["info"].get("eot_id") if meta else None
    if data.tokenizer != "bpe":
        path = os.path.expanduser(data.tokenizer)
        if not os.path.isdir(path):
            return None, eot, f"NOT copied: data.tokenizer={data.tokenizer} no longer exists; copy it by hand"
        return path, eot, f"copied from {path}"
    if meta is None or not meta["info"].get("tokenizer_path"):
        return None, None, (f"NOT copied: no token cache under {data.cache_dir} matches the run's data settings; "
                            "copy tokenizer.json and tokenizer_config.json from the cache the run used")
    path = os.path.join(meta["dir"], meta["info"]["tokenizer_path"])
    vocab = meta["info"].get("vocab_size")
    if vocab != job.model.vocab_size:
        return None, eot, (f"NOT copied: the cached BPE has {vocab} tokens but the model {job.model.vocab_size}; "
                           "the cache was rebuilt with other settings")
    return path, eot, f"BPE ({vocab} tokens) copied from {path}"


def _cache_meta(data) -> Optional[dict]:
    """meta.json of the newest token cache built with the same settings as `data` (cache_dir and
    seq_len do not change the tokens, so they are not compared)."""
    ignore = ("cache_dir", "seq_len")
    want = {k: v for k, v in _asdict(data).items() if k not in ignore}
    best = None
    for path in glob.glob(os.path.join(os.path.expanduser(data.cache_dir), "*", "meta.json")):
        meta = _read_json(path)
        if not meta or {k: v for k, v in meta.get("config", {}).items() if k not in ignore} != want:
            continue
        mtime = os.path.getmtime(path)
        if best is None or mtime > best[0]:
            best = (mtime, dict(meta, dir=os.path.dirname(path)))
    return best[1] if best else None


def _asdict(cfg) -> dict:
    import dataclasses
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # lists/tuples as JSON would store them


def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_readme(out_dir, run_dir, job, steps, val_loss, tok_note, copied) -> None:
    m = job.model
    lines = [
        f"Exported by `kintsugi export` from {os.path.abspath(run_dir)}",
        f"run {job.name!r}: {steps} steps, final validation loss "
        f"{'unknown (no summary.json)' if val_loss is None else f'{val_loss:.4f}'}",
        f"model: {m.n_layers} layers, dim {m.dim}, {m.n_heads} heads ({m.n_kv_heads} kv), ffn {m.ffn_dim}, "
        f"vocab {m.vocab_size}, rope_theta {m.rope_theta}, trained on sequences of {job.data.seq_len} tokens",
        "",
        "Load with:",
        "  from transformers import LlamaForCausalLM",
        f"  model = LlamaForCausalLM.from_pretrained({out_dir!r})",
        "",
        f"tokenizer: {tok_note}",
    ]
    if copied:
        lines += [f"  files: {', '.join(copied)}", "  AutoTokenizer.from_pretrained(this directory) loads it."]
    elif job.data.tokenizer == "byte":
        lines += ["  encode: list(text.encode('utf-8')); decode: bytes(ids).decode('utf-8', 'replace');",
                  "  every document ended with id 0, so generation stops at eos_token_id 0."]
    with open(os.path.join(out_dir, "README.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def verify_export(out_dir: str, seq_len: int = 32) -> float:
    """Max |logit difference| between transformers' model of `out_dir` and Kintsugi's Llama built
    from the same weights, on random token ids."""
    import torch
    from transformers import LlamaForCausalLM

    from kintsugi.trainer.model.llama import Llama, ModelConfig, load_hf_pretrained

    cfg, sd = load_hf_pretrained(out_dir, ModelConfig(max_seq_len=seq_len))
    ours = Llama(cfg).float().eval()
    ours.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    theirs = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((theirs(ids).logits - ours(ids)).abs().max())


# ---- report -------------------------------------------------------------------------------------

def report_command(argv: List[str]) -> int:
    ap = _Parser(prog="kintsugi report", description="Compare runs: a table on stdout, loss-vs-time and "
                 "bytes-per-channel figures in --out.")
    ap.add_argument("runs", nargs="+", help="run directories (outputs/<name>/<time>)")
    ap.add_argument("--out", default=".", help="directory for report.png and report.txt (default: .)")
    args = ap.parse_args(argv)
    from kintsugi.trainer.reporting.report import write_report
    try:
        table, png = write_report(args.runs, args.out)
    except ValueError as e:
        raise CommandError(str(e)) from None
    print(table)
    print(f"\nwrote {png} and {os.path.join(args.out, 'report.txt')}")
    return 0


# ---- join ---------------------------------------------------------------------------------------

def join_command(argv: List[str]) -> int:
    ap = _Parser(prog="kintsugi join", description="Offer this machine's devices to a running job as spares: "
                 "starts one worker per device and waits for them.")
    ap.add_argument("--coordinator", required=True, help="host:port of the job's coordinator")
    ap.add_argument("--workers", type=int, default=None,
                    help="workers to start (default: one per CUDA device, 1 without CUDA)")
    args = ap.parse_args(argv)
    from kintsugi.recovery import protocol as P
    try:
        P.parse_addr(args.coordinator)
    except ValueError:
        raise CommandError(f"--coordinator={args.coordinator!r} is not host:port; e.g. 10.0.0.1:29400") from None
    devices = _cuda_devices()
    n = args.workers if args.workers is not None else max(1, len(devices))
    if n < 1:
        raise CommandError(f"--workers={n} must be >= 1")
    if not os.environ.get(P.TOKEN_ENV):
        print(f"kintsugi join: warning: {P.TOKEN_ENV} is not set; a coordinator with a token will refuse "
              "these workers (export the token of the job)", file=sys.stderr)
    procs = start_workers(args.coordinator, n, devices)
    print(f"kintsugi join: {n} worker(s) offered to {args.coordinator} (pids "
          f"{', '.join(str(p.pid) for p in procs)}); waiting", file=sys.stderr)
    return wait_workers(procs)


def _cuda_devices() -> List[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries."""
    try:
        import torch
        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA is the CPU case, not an error
        count = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(count)]
    return ids[:count]


def worker_command(coordinator: str) -> List[str]:
    return [sys.executable, "-m", "kintsugi.trainer.runtime.worker", "--coordinator", coordinator]


def start_workers(coordinator: str, n: int, devices: List[str]) -> List[subprocess.Popen]:
    from kintsugi.parallel.device import join_devices
    from kintsugi.trainer.launch.local import child_env

    procs = []
    for visible in join_devices(n, devices):
        # One device per worker: each sees its device as cuda:0 (KINTSUGI_LAUNCHER=join binds it so).
        # Without CUDA the variable is left alone. KINTSUGI_PDEATHSIG (from child_env) ends the
        # workers if this process is killed.
        extra = {"KINTSUGI_LAUNCHER": "join"}
        if visible is not None:
            extra["CUDA_VISIBLE_DEVICES"] = visible
        procs.append(subprocess.Popen(worker_command(coordinator), env=child_env(extra)))
    return procs


def wait_workers(procs: List[subprocess.Popen]) -> int:
    """Wait for every worker; SIGTERM / SIGUSR1 sent to this process (a preemption notice) are passed
    on, so the workers hand their state over instead of dying with us. SIGINT from a terminal already
    reaches the whole process group and is not forwarded twice."""
    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        codes = [p.wait() for p in procs]
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return next((c for c in codes if c), 0)
