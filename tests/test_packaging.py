"""Packaging: ``kernels/`` installs as ``softmax_gpu.kernels``, never as a
top-level ``kernels`` (a PyPI package already owns that import name)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_file_list(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("softmax_gpu-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "softmax_gpu/kernels/softmax.py" in names
    assert "softmax_gpu/kernels/__init__.py" in names
    assert "softmax_gpu/__init__.py" in names
    for mod in (ROOT / "softmax_gpu").glob("*.py"):
        assert f"softmax_gpu/{mod.name}" in names, mod.name
    top = {n.split("/")[0] for n in names}
    assert "kernels" not in top, sorted(top)
    assert not any(n.startswith(("tests/", "perf/")) for n in names), sorted(top)
    for mod in (ROOT / "kernels").glob("*.py"):
        assert f"softmax_gpu/kernels/{mod.name}" in names, mod.name
    for mod in (ROOT / "softmax_gpu" / "integrations").glob("*.py"):
        assert f"softmax_gpu/integrations/{mod.name}" in names, mod.name


def test_installed_import_path():
    import softmax_gpu.kernels
    import softmax_gpu.kernels.softmax as k

    assert Path(k.__file__).resolve() == (ROOT / "kernels" / "softmax.py").resolve() or \
        Path(k.__file__).parent.name == "kernels"
    out = subprocess.run(
        [sys.executable, "-c",
         "import importlib.util as u; print(u.find_spec('kernels') is None or "
         "'softmax_gpu' not in (u.find_spec('kernels').origin or ''))"],
        capture_output=True, text=True, cwd="/",
    )
    assert out.stdout.strip() == "True", out
