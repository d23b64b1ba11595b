"""Packaging: ``kernels/`` installs as ``softmax_gpu.kernels``, never as a
top-level ``kernels`` (a PyPI package already owns that import name); the
tuned tables (``softmax_gpu/tuned/*.json``) install with the package."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_file_list(tmp_path):
    # Built from a copy of the sources with a tuned table added, so that the
    # package data is checked whether or not a table is committed yet.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("softmax_gpu", "kernels"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    (src / "softmax_gpu" / "tuned").mkdir(exist_ok=True)
    (src / "softmax_gpu" / "tuned" / "fake-gpu.json").write_text("{}")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(wheels), str(src)],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )
    (wheel,) = wheels.glob("softmax_gpu-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tables = {f"softmax_gpu/tuned/{p.name}" for p in (src / "softmax_gpu" / "tuned").glob("*.json")}
    assert "softmax_gpu/tuned/fake-gpu.json" in tables
    assert tables <= set(names), sorted(tables - set(names))
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
