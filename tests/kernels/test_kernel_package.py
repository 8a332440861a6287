"""kernels/ is installed as loadspec.kernels only, never as a top-level `kernels` (Hugging Face's package name)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_installed_as_subpackage_only(tmp_path):
    # outside the checkout, as an installed loadspec is used: no repo root on sys.path
    code = ("import importlib.util, loadspec.kernels.rmsnorm as r, loadspec.kernels as k, sys; "
            "spec = importlib.util.find_spec('kernels'); "
            "print(r.__name__, r.VERSION, 'triton' in sys.modules); "
            "print('top-level:', None if spec is None else spec.origin)")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()[-2:]
    assert first.startswith("loadspec.kernels.rmsnorm ")
    origin = second.removeprefix("top-level: ")
    assert origin == "None" or not Path(origin).resolve().is_relative_to(ROOT / "kernels"), origin


def test_pyproject_maps_the_folder():
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {"loadspec.kernels": "kernels"}
    assert "loadspec.kernels" in tool["packages"] and "kernels" not in tool["packages"]


def test_checkout_root_does_not_fake_hf_kernels():
    """From a checkout (root on sys.path) transformers may import the folder as `kernels` while probing: it must
    then see no version, so it never thinks Hugging Face's hub kernels are installed because of us."""
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin and Path(spec.origin).resolve().is_relative_to(ROOT / "kernels"):
        from transformers.utils.import_utils import is_kernels_available

        assert not is_kernels_available()
