"""One import name: Kintsugi installs as `kintsugi` and coexists with other distributions.

The repository's top-level folders used to be installed as top-level modules (`kernels`, `trainer`,
...): from the repository root our `kernels/` shadowed Hugging Face's `kernels` (transformers could
not import), and elsewhere theirs shadowed ours. These tests run plain processes, as a user would,
in the environment the README's test command builds (no PYTHONPATH), from the repository root and
from a directory outside it.
"""
import os
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOPS = ("kernels", "compression", "parallel", "recovery", "trainer", "benchmarks")


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", ["repo root", "outside"])
def test_transformers_llama_imports_beside_kintsugi(where, tmp_path):
    pytest.importorskip("transformers")
    cwd = ROOT if where == "repo root" else tmp_path
    code = ("import importlib.util, os\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "import kintsugi.kernels.dispatch\n"
            "m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,\n"
            "                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print('kernels from', None if spec is None else (spec.origin or list(spec.submodule_search_locations)))\n")
    proc = _python(code, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Whatever `kernels` is here (Hugging Face's, or none), it is never our folder.
    assert os.path.join(ROOT, "kernels") not in proc.stdout, proc.stdout


def test_codec_round_trip_in_a_plain_process_outside_the_repo(tmp_path):
    code = ("import torch\n"
            "from kintsugi.compression.codecs import get_codec\n"
            "x = torch.linspace(-3, 3, 1000)\n"
            "c = get_codec('int8', 256)\n"
            "payload = c.encode(x)\n"
            "y = c.decode(payload, x.numel())\n"
            # int8, one bf16 scale per 256 values, rounded up: a step is at most (max|x| / 127) x
            # (1 + 2^-7) and the error at most half a step
            "assert payload.dtype == torch.uint8 and payload.numel() < x.numel() * 4\n"
            "assert float((y - x).abs().max()) <= 3 / 127 * (1 + 2 ** -7) / 2, float((y - x).abs().max())\n"
            "print('ok')\n")
    proc = _python(code, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_the_console_script_and_python_m_work_from_anywhere(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for cmd, cwd in (([sys.executable, "-m", "kintsugi.trainer", "--version"], tmp_path),
                     ([sys.executable, "-m", "trainer", "--version"], ROOT)):
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith("kintsugi "), (cmd, proc.stderr[-2000:])


def test_top_level_folders_cannot_shadow_other_distributions():
    # A folder with an __init__.py at the repository root is a regular package that wins over any
    # installed one of the same name for every process started there.
    for top in TOPS:
        assert not os.path.exists(os.path.join(ROOT, top, "__init__.py")), f"{top}/__init__.py shadows others"


def test_pyproject_installs_every_folder_that_holds_modules():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    want = {"kintsugi", "kintsugi.conf"}
    for top in TOPS:
        for d, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            if any(f.endswith(".py") for f in files):
                want.add("kintsugi." + os.path.relpath(d, ROOT).replace(os.sep, "."))
    assert listed == want, f"pyproject.toml packages: missing {sorted(want - listed)}, extra {sorted(listed - want)}"
