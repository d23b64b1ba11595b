"""examples/train_tiny_llama.py as a CPU smoke test, in a subprocess, on
softmax_gpu's torch path (TRITON_INTERPRET unset): the three runs (plain,
loss hook, fused) train and give the same loss curve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_train_tiny_llama_smoke(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    png, out = tmp_path / "curves.png", tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_tiny_llama.py"), "--smoke", "--steps", "3",
         "--device", "cpu", "--out", str(png), "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "softmax_gpu backend: torch" in proc.stdout
    assert png.stat().st_size > 10_000
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["plain", "hook", "fused"]
    plain = results["plain"]["losses"]
    assert len(plain) == 3 and all(4.0 < x < 7.0 for x in plain)  # ~ln(256) at the start
    for mode in ("hook", "fused"):
        for a, b in zip(results[mode]["losses"], plain):
            assert abs(a - b) <= 1e-5 * abs(b), (mode, results[mode]["losses"], plain)
    # the summary table, one markdown row per mode: step time, tokens/s, peak, final loss
    rows = {r.split("|")[1].strip(): r for r in proc.stdout.splitlines() if r.startswith("| ")}
    for mode in ("plain", "hook", "fused"):
        cells = [c.strip() for c in rows[mode].strip("|").split("|")]
        assert len(cells) == 5 and float(cells[1]) > 0, rows[mode]
        assert abs(float(cells[4]) - results[mode]["losses"][-1]) < 1e-3, rows[mode]
