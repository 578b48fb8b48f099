"""The repository root on sys.path (python -m pytest, python -m megavl...) hides no installed package."""
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_the_kernels_folder_does_not_shadow_an_installed_kernels_package():
    """kernels/ once held megavl_kernels' __init__.py, so from the root `import kernels` found our folder
    instead of Hugging Face's `kernels`, which transformers >= 5 imports (`from kernels import
    CUDAProperties`: ImportError in every module that touched transformers' BERT)."""
    code = ("import importlib.util, megavl_kernels, transformers.activations; "
            "spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else None)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin = proc.stdout.strip().splitlines()[-1]
    assert not origin.startswith(str(REPO / "kernels")), origin
    assert importlib.util.find_spec("megavl_kernels").origin == str(REPO / "kernels/megavl_kernels/__init__.py")
