"""The import contracts (.importlinter): layers point one way (kernels -> compression -> parallel ->
recovery -> trainer) and no package has an import cycle. Checked with import-linter by
scripts/lint_imports.py, as .ci/run does; and the check is shown to fail on a forbidden import."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "lint_imports.py")

pytestmark = pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed")


def _lint(root):
    return subprocess.run([sys.executable, SCRIPT, "--root", str(root)], capture_output=True, text=True, timeout=300)


def test_the_repository_keeps_every_import_contract():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


def test_a_lower_layer_importing_the_trainer_breaks_the_check(tmp_path):
    # A copy of the sources with one forbidden import added: recovery/ reaching up into trainer/.
    for name in ("__init__.py", ".importlinter"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    for top in ("kernels", "compression", "parallel", "recovery", "trainer", "benchmarks"):
        shutil.copytree(os.path.join(ROOT, top), tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "recovery" / "plan.py", "a") as f:
        f.write("\nfrom kintsugi.trainer.config.job import JobConfig  # noqa: E402,F401 - the planted bug\n")
    proc = _lint(tmp_path)
    assert proc.returncode != 0
    assert "kintsugi.recovery.plan -> kintsugi.trainer.config.job" in proc.stdout, proc.stdout[-3000:]
