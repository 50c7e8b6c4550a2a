"""Check the import contracts of .importlinter with import-linter (a maintained tool made for it).

The repository's top-level folders are installed as `kintsugi.<folder>` and deliberately have no
__init__.py (so they never shadow another distribution's module); import-linter's analyser only
walks packages that have one. So this builds a mirror, in a temporary directory, where
`kintsugi/<folder>/...` links every module of the repository and every package has an __init__.py,
and runs `lint-imports` there. Exit code: import-linter's (0 = every contract kept).

    python scripts/lint_imports.py [--root REPO]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

TOPS = ("kernels", "compression", "parallel", "recovery", "trainer", "benchmarks")


def build_mirror(root: str, dest: str) -> str:
    pkg = os.path.join(dest, "kintsugi")
    os.makedirs(pkg)
    shutil.copyfile(os.path.join(root, "__init__.py"), os.path.join(pkg, "__init__.py"))
    for top in TOPS:
        for d, dirs, files in os.walk(os.path.join(root, top)):
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            out = os.path.join(pkg, os.path.relpath(d, root))
            os.makedirs(out, exist_ok=True)
            for f in files:
                if f.endswith(".py"):
                    os.symlink(os.path.join(d, f), os.path.join(out, f))
            if not os.path.exists(os.path.join(out, "__init__.py")):
                open(os.path.join(out, "__init__.py"), "w").close()
    return pkg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = ap.parse_args(argv)
    exe = shutil.which("lint-imports")
    if exe is None:
        print("lint_imports: import-linter is not installed; pip install -e \".[test]\" brings it", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="kintsugi-lint-") as tmp:
        build_mirror(args.root, tmp)
        env = dict(os.environ, PYTHONPATH=tmp)  # the mirror's `kintsugi` comes before the installed one
        return subprocess.run([exe, "--config", os.path.join(args.root, ".importlinter"), "--no-cache"],
                              cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
