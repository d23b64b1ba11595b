"""Packaging: ``kernels/`` installs as ``softmax_gpu.kernels``, never as a
top-level ``kernels`` (a PyPI package that transformers requires owns that
import name); no folder or module at the repository root wins an import over
an installed distribution of its name; the tuned tables
(``softmax_gpu/tuned/*.json``) install with the package."""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

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
    # A namespace folder in the wheel too: nothing there can become a regular
    # top-level ``kernels``.
    assert "softmax_gpu/kernels/__init__.py" not in names
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
    # The installed wheel imports its kernels from inside the package, from a
    # folder that holds no checkout.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    out = subprocess.run(
        [sys.executable, "-c",
         "import softmax_gpu, softmax_gpu.kernels.softmax as k, softmax_gpu.kernels.cross_entropy; "
         "print(k.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, env=_env(PYTHONPATH=str(site)),
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == site / "softmax_gpu" / "kernels" / "softmax.py"


def test_installed_import_path():
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


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def _root_names():
    """The names a folder or module at the repository root could be imported as."""
    names = set()
    for p in ROOT.iterdir():
        if p.name.startswith((".", "_")) or p.name == "softmax_gpu" or p.name.endswith(".egg-info"):
            continue
        if p.is_dir() and p.name.isidentifier():
            names.add(p.name)
        elif p.suffix == ".py":
            names.add(p.stem)
    return sorted(names)


def test_root_names_never_shadow_installed_distributions(tmp_path):
    # Every name at the root (kernels, perf, examples, tests...) gets a fake
    # installed regular package; from the root, under `python -c`, `python
    # script.py` and `python -m`, each import finds the installed one.
    names = _root_names()
    assert {"kernels", "perf", "examples", "tests"} <= set(names), names
    site = tmp_path / "site"
    for name in names:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("INSTALLED = True\n")
    check = "; ".join(f"import {n}; assert getattr({n}, 'INSTALLED', False), {n}.__path__"
                      for n in names)
    script = ROOT / f"_shadow_probe_{os.getpid()}.py"
    script.write_text(check + "\n")
    try:
        for argv in ([sys.executable, "-c", check], [sys.executable, script.name],
                     [sys.executable, "-m", script.stem]):
            out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT,
                                 env=_env(PYTHONPATH=str(site)))
            assert out.returncode == 0, (argv[1:], out.stderr[-2000:])
    finally:
        script.unlink()


def test_source_checkout_imports_its_own_kernels():
    # From the root and from elsewhere: softmax_gpu.kernels is the folder of
    # this checkout (editable install or the root on sys.path), and nothing
    # binds a top-level `kernels` to it.
    code = ("import sys, softmax_gpu.kernels.softmax as k; print(k.__file__); "
            "m = sys.modules.get('kernels'); print(getattr(m, '__file__', None))")
    for cwd in (ROOT, "/"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=cwd, env=_env(PYTHONPATH=str(ROOT)))
        assert out.returncode == 0, out.stderr
        mine, top = out.stdout.split()
        assert Path(mine).resolve() == (ROOT / "kernels" / "softmax.py").resolve()
        # (not this checkout's kernels folder; a venv inside the checkout,
        # as `python -m venv .venv` makes, may hold the PyPI package)
        assert top == "None" or (ROOT / "kernels") not in Path(top).resolve().parents, top


def test_pypi_kernels_and_transformers_import_from_the_root(tmp_path):
    # The `kernels` distribution is in the test extra (and transformers
    # requires it): this test never skips.
    from importlib import metadata

    try:
        metadata.version("kernels")
    except metadata.PackageNotFoundError:
        pytest.fail("the `kernels` distribution is not installed: pip install -e '.[test]'")
    code = textwrap.dedent("""
        import kernels, pathlib, sys
        root = pathlib.Path(sys.argv[-1]).resolve()
        where = pathlib.Path(kernels.__file__).resolve()
        # not this checkout's device code (a venv inside the checkout, as
        # `python -m venv .venv` makes, holds the PyPI package: allowed)
        assert root / "kernels" not in where.parents, where
        from kernels import CUDAProperties
        try:
            import transformers
        except ImportError:
            transformers = None
        if transformers is not None:
            from transformers import LlamaConfig, LlamaForCausalLM
            import softmax_gpu.kernels.cross_entropy
        print("ok", where)
    """)
    probe = tmp_path / "probe.py"
    probe.write_text(code)
    test_file = tmp_path / "test_probe.py"
    test_file.write_text("import runpy, sys\n\ndef test_probe():\n"
                         f"    sys.argv = ['probe', {str(ROOT)!r}]\n"
                         f"    runpy.run_path({str(probe)!r})\n")
    runs = [
        [sys.executable, "-c", code, str(ROOT)],
        [sys.executable, str(probe), str(ROOT)],
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         str(test_file)],
    ]
    pytest_bin = shutil.which("pytest")
    if pytest_bin:
        runs.append([pytest_bin, "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                     str(test_file)])
    for argv in runs:
        out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=_env())
        assert out.returncode == 0, (argv[1:3], out.stdout[-2000:], out.stderr[-2000:])


def test_no_mutated_op_argument_has_a_default():
    """Every softmax_gpu op that writes an argument declares it without a
    default. torch 2.11 (the GPU image's) drops trailing arguments equal to
    their defaults before bumping the mutated argument's version, which then
    fails with an IndexError (torch.compile of a training step)."""
    import torch

    import softmax_gpu  # noqa: F401  (registers the ops)

    ns = torch.ops.softmax_gpu
    mutating = []
    for name in dir(ns):
        op = getattr(ns, name, None)
        if not hasattr(op, "default"):
            continue
        for a in op.default._schema.arguments:
            if a.alias_info is not None and a.alias_info.is_write:
                mutating.append(name)
                assert not a.has_default_value(), f"softmax_gpu::{name}: {a.name} has a default"
    assert "linear_cross_entropy_backward" in mutating and "cross_entropy_forward_" in mutating


def test_jit_trace_records_the_ops():
    """torch.jit.trace of a model calling softmax, log_softmax, cross_entropy
    and linear_cross_entropy records the softmax_gpu:: ops (the eager path's
    launch planning read traced sizes: AttributeError), and the traced module
    gives the eager results and gradients at another batch size too, also
    after torch.jit.save / load."""
    import io
    import warnings

    import torch

    import softmax_gpu as sg
    from helpers import DEVICE

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 10).to(DEVICE)

        def forward(self, x, t):
            h = self.lin(x)
            return (sg.cross_entropy(h, t, label_smoothing=0.1) + sg.log_softmax(h, 1).mean()
                    + sg.softmax(h, -1).pow(2).sum() + sg.linear_cross_entropy(x, self.lin.weight, t))

    g = torch.Generator().manual_seed(0)
    net = Net()
    x = torch.randn(5, 8, generator=g).to(DEVICE)
    t = torch.randint(0, 10, (5,), generator=g).to(DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(net, (x, t), check_trace=False)
    ops = [n.kind() for n in traced.graph.nodes() if n.kind().startswith("softmax_gpu::")]
    assert ops == ["softmax_gpu::cross_entropy_forward", "softmax_gpu::softmax_forward",
                   "softmax_gpu::softmax_forward", "softmax_gpu::linear_cross_entropy_forward"], ops
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x7 = torch.randn(7, 8, generator=g).to(DEVICE)
    t7 = torch.randint(0, 10, (7,), generator=g).to(DEVICE)
    for module in (traced, loaded):
        for xs, ts in ((x, t), (x7, t7)):
            got, want = module(xs, ts), net(xs, ts)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            (dg,) = torch.autograd.grad(got, module.lin.weight)  # loaded: a copy
            (dw,) = torch.autograd.grad(want, net.lin.weight)
            torch.testing.assert_close(dg, dw, rtol=1e-5, atol=1e-6)
