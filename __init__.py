"""Kintsugi: pipeline-parallel LLM training that mends itself when machines fail.

The repository keeps its top-level folders (kernels/, compression/, parallel/, recovery/, trainer/,
benchmarks/, conf/), but they are installed and imported under this one name: `kintsugi.kernels`,
`kintsugi.trainer`, ... (pyproject.toml maps the package to the repository root). The folders have
no `__init__.py` of their own, so from the repository root they are at most namespace portions:
they never shadow another distribution's module of the same name (Hugging Face's `kernels`, which
transformers imports; Coqui's `trainer`), and an installed Kintsugi never shadows them either.
"""
import os as _os

__version__ = "0.1.0"
CONF_DIR = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "conf")
