"""The tuned-table lookup (``heuristics.limits_for``), the tuning run
(``python -m perf.tune``), its ``--install``, and the output limits of
``perf/device_check.sh``. All on CPU: the GPU is faked by its name."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest
import torch

from softmax_gpu import heuristics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the perf/ folder (not installed)

from perf import env, tune  # noqa: E402
from perf.providers import Provider  # noqa: E402

GPU = torch.device("cuda", 0)  # never touched: the device name is faked below
FAKE_NAME = "Fake GPU 9000 HBM9"
FAKE_SLUG = "fake-gpu-9000-hbm9"


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    """A CUDA device named FAKE_NAME whose tables live in tmp_path; counts the
    name look-ups (one per device read)."""
    calls = []

    def name(index):
        calls.append(index)
        return FAKE_NAME

    monkeypatch.setattr(heuristics, "_device_name", name)
    monkeypatch.setattr(heuristics, "TUNED_DIR", str(tmp_path))
    heuristics.clear_tuned()
    yield tmp_path, calls
    heuristics.clear_tuned()


def _table(ops, slug=FAKE_SLUG, **extra):
    return {"schema": 1, "slug": slug, "device": FAKE_NAME, "meaningless": False, "ops": ops, **extra}


def _write(folder, data, slug=FAKE_SLUG) -> Path:
    path = Path(folder) / f"{slug}.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


GOOD = {
    "softmax": {"2": [{"n": 4096, "limits": {"tile": 2048, "target_program_elems": 8192}},
                      {"n": 65536, "limits": {"tile": 8192}},
                      {"n": 16384, "limits": {}}]},
    "cross_entropy": {"2": [{"n": 32000, "limits": {"tile": 16384, "ce_max_single_2byte": 32768}}]},
}


# --- the lookup ---------------------------------------------------------------


def test_no_table_gives_the_defaults(fake_gpu):
    folder, calls = fake_gpu
    assert heuristics.limits_for("softmax", GPU, 2, 4096) is heuristics.limits()
    assert heuristics.limits_for("cross_entropy", "cuda:0", 2, 50257) is heuristics.limits()
    assert calls == [0]  # looked for once, then cached
    with pytest.raises(ValueError, match="op must be one of"):
        heuristics.limits_for("attention", GPU, 2, 4096)


def test_fake_gpu_table_overrides_at_the_right_row_length(fake_gpu):
    folder, calls = fake_gpu
    _write(folder, _table(GOOD))
    d = heuristics.Limits()

    def at(op, n, elem=2, device=GPU):
        return heuristics.limits_for(op, device, elem, n)

    # the nearest tuned row length at or below n, else the smallest
    assert at("softmax", 100).tile == 2048 and at("softmax", 100).target_program_elems == 8192
    assert at("softmax", 4096).tile == 2048
    assert at("softmax", 16383).tile == 2048
    assert at("softmax", 16384) == d  # an empty entry: the defaults won there
    assert at("softmax", 65535) == d
    assert at("softmax", 65536).tile == 8192 and at("softmax", 1 << 20).tile == 8192
    assert at("softmax", 65536).target_program_elems == d.target_program_elems
    assert at("softmax", 4096, elem=2).max_single_2byte == d.max_single_2byte
    ce = at("cross_entropy", 50257)
    assert (ce.tile, ce.ce_max_single_2byte) == (16384, 32768)
    assert at("cross_entropy", 1000).tile == 16384  # below the smallest: the smallest
    # fp16 shares bf16's entries (2-byte elements); other sizes have none
    assert at("softmax", 4096, elem=2).tile == at("softmax", 4096, elem=1).tile == 2048
    assert at("softmax", 4096, elem=4) is heuristics.limits()
    assert at("softmax", 4096, elem=8) is heuristics.limits()
    # CPU tensors never use a table
    assert at("softmax", 4096, device=torch.device("cpu")) is heuristics.limits()
    assert calls == [0]  # one read for all of these
    # sm_count stays the device's: a table cannot set it
    assert at("softmax", 4096).sm_count is None


def test_override_ignores_the_table(fake_gpu):
    folder, _ = fake_gpu
    _write(folder, _table(GOOD))
    with heuristics.override():
        assert heuristics.limits_for("softmax", GPU, 2, 4096) == heuristics.Limits()
    with heuristics.override(tile=16) as lim:
        assert heuristics.limits_for("softmax", GPU, 2, 65536) is lim
        assert lim.tile == 16
    assert heuristics.limits_for("softmax", GPU, 2, 65536).tile == 8192


def test_override_of_one_op_moves_only_its_plans(fake_gpu):
    """override(op=...) puts fields in force for one table op (what the tuner
    times: an installed entry's effect), on top of the enclosing limits; the
    other ops keep those, and no table is read meanwhile."""
    folder, _ = fake_gpu
    _write(folder, _table(GOOD))
    with heuristics.override(sm_count=2) as outer:
        with heuristics.override(op="softmax_backward", tile=16, long_path="resident") as lim:
            assert heuristics.limits_for("softmax_backward", GPU, 2, 65536) is lim
            assert (lim.tile, lim.long_path, lim.sm_count) == (16, "resident", 2)
            for op in ("softmax", "log_softmax", "cross_entropy"):
                assert heuristics.limits_for(op, GPU, 2, 65536) is outer
            assert heuristics.limits() is outer
        assert heuristics.limits_for("softmax_backward", GPU, 2, 65536) is outer
    with heuristics.override(op="log_softmax", tile=32):
        # the table is not read for the other ops either
        assert heuristics.limits_for("softmax", GPU, 2, 65536) == heuristics.Limits()
    assert heuristics.limits_for("softmax", GPU, 2, 65536).tile == 8192
    with pytest.raises(ValueError, match="op must be one of"):
        with heuristics.override(op="attention", tile=16):
            pass


def test_each_softmax_kind_reads_only_its_own_entries(fake_gpu):
    """The forward's entries ("softmax") do not move the log-softmax forward
    or the backward: each has its own op in a table, or the defaults."""
    folder, _ = fake_gpu
    _write(folder, _table({**GOOD, "log_softmax": {"2": [{"n": 32768, "limits": {"tile": 2048}}]}}))
    assert heuristics.limits_for("softmax", GPU, 2, 65536).tile == 8192
    assert heuristics.limits_for("log_softmax", GPU, 2, 65536).tile == 2048
    assert heuristics.limits_for("softmax_backward", GPU, 2, 65536) is heuristics.limits()


def test_tables_are_read_lazily_once_per_device(fake_gpu):
    folder, calls = fake_gpu
    _write(folder, _table(GOOD))
    from softmax_gpu.softmax import softmax_config

    heuristics.limits()
    softmax_config(64, 4096, 2, torch.device("cpu"))  # planning on CPU never reads a table
    assert calls == []
    heuristics.limits_for("softmax", GPU, 2, 4096)
    heuristics.limits_for("softmax", torch.device("cuda", 1), 2, 4096)
    heuristics.limits_for("cross_entropy", GPU, 2, 32000)
    assert calls == [0, 1]
    heuristics.clear_tuned()
    heuristics.limits_for("softmax", GPU, 2, 4096)
    assert calls == [0, 1, 0]


def test_importing_the_package_reads_no_table():
    code = ("import softmax_gpu.heuristics as h; "
            "print(h._tuned_for_device.cache_info().misses)")
    envv = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=envv,
                         cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


@pytest.mark.parametrize("bad, field", [
    ({"tilee": 2048}, "tilee"),  # not a Limits field
    ({"tile": 3000}, "tile"),  # not a power of two
    ({"tile": 0}, "tile"),
    ({"tile": "4096"}, "tile"),  # a string
    ({"split_programs_per_sm": True}, "split_programs_per_sm"),  # a bool for an int
    ({"max_single_2byte": 1.5}, "max_single_2byte"),
    ({"sm_count": 8}, "sm_count"),  # a fact about the device
    ({"long_warps": 6}, "long_warps"),  # warps: a power of two
    ({"long_stages": 5}, "long_stages"),  # not a depth the static check compiles
    ({"ce_single_ept": 64}, "ce_single_ept"),  # likewise
])
def test_a_bad_field_warns_naming_file_and_field_and_is_ignored(fake_gpu, bad, field):
    folder, _ = fake_gpu
    ops = {"softmax": {"2": [{"n": 4096, "limits": {"tile": 2048}},
                             {"n": 65536, "limits": {**bad, "target_program_elems": 8192}}]}}
    path = _write(folder, _table(ops))
    with pytest.warns(heuristics.TunedTableWarning) as caught:
        lim = heuristics.limits_for("softmax", GPU, 2, 65536)
    text = " ".join(str(w.message) for w in caught)
    assert str(path) in text and repr(field) in text
    assert lim == heuristics.Limits()  # the bad entry: the defaults at its row length
    assert heuristics.limits_for("softmax", GPU, 2, 4096).tile == 2048  # the good one still applies


@pytest.mark.parametrize("content, words", [
    ("{not json", "cannot read"),
    (json.dumps(_table(GOOD) | {"schema": 2}), "schema"),
    (json.dumps(_table(GOOD, slug="another-gpu")), "slug"),
    (json.dumps(_table(["softmax"])), "'ops'"),
    (json.dumps(_table({"softmax": {"2": [{"n": "4096", "limits": {}}]}, "attention": {}})),
     "attention"),
    (json.dumps(_table({"softmax": {"16": []}})), "element size"),
])
def test_a_malformed_table_warns_and_is_ignored(fake_gpu, content, words):
    folder, _ = fake_gpu
    path = _write(folder, content)
    with pytest.warns(heuristics.TunedTableWarning) as caught:
        lim = heuristics.limits_for("softmax", GPU, 2, 4096)
    text = " ".join(str(w.message) for w in caught)
    assert str(path) in text and words in text, text
    assert lim is heuristics.limits()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read once: no second warning
        heuristics.limits_for("softmax", GPU, 2, 4096)


def test_device_name_lookup_failure_is_a_warning(monkeypatch, tmp_path):
    def broken(index):
        raise RuntimeError("no driver")

    monkeypatch.setattr(heuristics, "_device_name", broken)
    heuristics.clear_tuned()
    try:
        with pytest.warns(heuristics.TunedTableWarning, match="no driver"):
            assert heuristics.limits_for("softmax", GPU, 2, 4096) is heuristics.limits()
    finally:
        heuristics.clear_tuned()


def test_slug_is_the_harness_slug():
    assert env.slug("NVIDIA H100 80GB HBM3") == heuristics.device_slug("NVIDIA H100 80GB HBM3") \
        == "nvidia-h100-80gb-hbm3"
    assert heuristics.device_slug("NVIDIA H200") == "nvidia-h200"
    assert heuristics.tuned_path("nvidia-h200").endswith(os.path.join("tuned", "nvidia-h200.json"))


# --- the candidates -------------------------------------------------------------


def _plan_fields(plan: str) -> dict:
    return dict(kv.split("=", 1) for kv in plan.split())


@pytest.mark.parametrize("l2_mib", [50, 60])  # H100, H200
def test_the_candidates_a_gpu_run_times_include_every_design(l2_mib):
    """Within the first ``max_candidates`` (what a tuning run times) at the
    long vocabularies: every forced long-row path, and the cooperative path
    with its reads in flight at half an L2 partition (a quarter of L2; its
    chunks finer than the default's); at 32000 the on-chip path too."""
    from perf.sizes import Shape

    cap = tune.TuneConfig(device="cuda", spaces=[]).max_candidates
    gpu = {"sm_count": 132, "l2_bytes": l2_mib << 20}
    for vocab in (128256, 151936):
        got = tune.candidates(tune.CROSS_ENTROPY, Shape(16384, vocab), "cpu", gpu, limit=cap)
        names = {c.name: _plan_fields(c.plan) for c in got}
        default = _plan_fields(got[0].plan)
        assert default["path"] == "coop"
        part = names["coop+l2=1/4"]
        assert part["path"] == "coop" and int(part["splits"]) > int(default["splits"])
        in_flight = int(part["programs"]) * int(part["chunk"]) * tune.ELEM
        assert in_flight <= (l2_mib << 20) // 4 < int(default["programs"]) * \
            int(default["chunk"]) * tune.ELEM, vocab
        assert {"rowloop", "persistent", "resident"} <= set(names), vocab
    got = tune.candidates(tune.CROSS_ENTROPY, Shape(16384, 32000), "cpu", gpu, limit=cap)
    assert got[1].name == "onchip" and _plan_fields(got[1].plan)["path"] == "single"
    assert "onchip" not in {c.name for c in tune.candidates(
        tune.CROSS_ENTROPY, Shape(131072, 4096), "cpu", gpu)}  # on chip by default


def test_candidates_are_distinct_plans_defaults_first():
    from perf.sizes import Shape

    gpu = {"sm_count": 132}
    sm = tune.candidates(tune.SOFTMAX, Shape(16384, 32768), "cpu", gpu)
    assert sm[0].name == "default" and sm[0].fields == {}
    plans = [c.plan for c in sm]
    assert len(set(plans)) == len(plans)
    assert "path=single" in sm[0].plan
    assert any("path=single" not in p and "block_n=2048" in p for p in plans)
    for c in sm:  # every candidate is a valid table entry
        assert all(heuristics._field_problem(k, v) is None for k, v in c.fields.items()), c
    ce = tune.candidates(tune.CROSS_ENTROPY, Shape(16384, 32000), "cpu", gpu)
    assert {c.name for c in ce} >= {"default", "tile=2048", "onchip"}
    long = tune.candidates(tune.CROSS_ENTROPY, Shape(16384, 128256), "cpu", gpu)
    assert len({c.plan for c in long}) == len(long)
    # the default plan is cooperative there; one program per row and the
    # persistent grid are forced, and the long-row fields vary the plan
    assert "path=coop" in long[0].plan
    assert {c.name for c in long} >= {"default", "rowloop", "persistent", "tile=2048",
                                      "programs_per_sm=1", "evict=False", "coop_splits=2"}
    # chunks held in registers, at the default chunk and smaller ones
    resident = [c for c in long if c.name.startswith("resident")]
    assert resident and all("path=resident" in c.plan for c in resident)
    assert "onchip" not in {c.name for c in long}  # 128256 is beyond the on-chip limit
    assert any("num_warps=4" in c.plan for c in long if c.name == "long_warps=4")
    assert len(tune.candidates(tune.SOFTMAX, Shape(16384, 32768), "cpu", gpu, limit=2)) == 2
    # at 32768 the forward, and the log-softmax forward and the backward (32
    # warps), are on chip; their forced long-row paths take the row off chip
    # to run there too (the forward: two resident chunks of 16384; the two
    # others: their long-row plans without the 32 warps, the old defaults)
    for space, off in ((tune.SOFTMAX, {"max_single_2byte": 16384}),
                       (tune.LOG_SOFTMAX, {"wide_single": False}),
                       (tune.SOFTMAX_BACKWARD, {"wide_single": False})):
        got = tune.candidates(space, Shape(16384, 32768), "cpu", gpu)
        assert "path=single" in got[0].plan and "block_n=32768" in got[0].plan, space.table_op
        forced = [c for c in got if "long_path" in c.fields]
        assert forced and all(c.fields.items() >= off.items() and "path=single" not in c.plan
                              for c in forced), space.table_op
        assert [c.name for c in got[:11]] == ["default"] + [c.name for c in forced[:10]]
        # not at the rows the defaults keep on chip with room to spare
        short = tune.candidates(space, Shape(16384, 16384), "cpu", gpu)
        assert not any("long_path" in c.fields for c in short), space.table_op
        # there the two-row kinds' default is two 16-warp programs per SM
        # (64 registers); one per SM (128) is the only candidate (the forward
        # ranks the forced paths at those rows)
        if space is not tune.SOFTMAX:
            names = {c.name: c.plan for c in short}
            assert list(names) == ["default", "lean_single=False"], names
            assert "regs=64" in names["default"] and "num_warps=16" in names["default"]
            assert "regs=128" in names["lean_single=False"], names
    for space in (tune.LOG_SOFTMAX, tune.SOFTMAX_BACKWARD):
        assert "num_warps=32" in tune.candidates(space, Shape(16384, 32768), "cpu",
                                                 gpu)[0].plan, space.table_op
    for space in (tune.SOFTMAX, tune.SOFTMAX_BACKWARD, tune.LOG_SOFTMAX):
        got = tune.candidates(space, Shape(16384, 32768), "cpu", gpu)
        assert len({c.plan for c in got}) == len(got)
        assert {"default", "resident", "rowloop"} <= {c.name for c in got}, space.table_op
        assert any("path=resident block_n=16384" in c.plan for c in got if c.name == "resident")


# --- the tuning run -------------------------------------------------------------


class FakeSoftmax(Provider):
    """torch.softmax, with the candidate's limits deciding its behaviour: wrong
    (and fastest) at tile 64, raising at tile 8, fast at tile 32, slow
    otherwise. Its times come from :func:`tile_clock`, not the wall clock,
    which a loaded machine can reorder (a 10 ms sleep for the slow ones was
    outrun by a descheduled fast one)."""

    name = "fake_softmax"

    def function(self, family):
        assert family == "softmax"

        def f(x):
            tile = _tile()
            if tile == 64:
                return torch.zeros_like(x)  # wrong
            if tile == 8:
                raise RuntimeError("does not compile")
            return torch.softmax(x.float(), -1).to(x.dtype)

        return f


def _tile() -> int:
    # the candidate's fields are in force for its table op only
    return heuristics.limits_for("softmax", torch.device("cpu"), 2, 256).tile


@pytest.fixture
def tile_clock(monkeypatch):
    """The tuner's timings, by the tile in force: 0.5 ms at 64 (FakeSoftmax's
    wrong one), 1 ms at 32, 10 ms at any other."""
    from perf import timing

    def bench(fn, device, *, grad_to_none=None, warmup_ms=25, rep_ms=100):
        fn()
        ms = {64: 0.5, 32: 1.0}.get(_tile(), 10.0)
        return ms, ms, ms

    monkeypatch.setattr(timing, "bench", bench)


def _cpu_info():
    return env.run_info("cpu")


def test_tuning_never_chooses_a_wrong_or_failing_candidate(tile_clock):
    cfg = tune.TuneConfig(device="cpu", spaces=[tune.SOFTMAX], ns=(256,), m=8, rep_ms=1,
                          copy_bytes=1 << 16)
    info = _cpu_info()
    rows = tune.run_tuning(cfg, info, provider=FakeSoftmax(), log=lambda s: None)
    assert rows[0]["op"] == "copy" and rows[0]["gbps"] > 0
    by = {r["candidate"]: r for r in rows[1:]}
    assert {"default", "tile=8", "tile=32", "tile=64"} <= set(by)
    assert by["tile=64"]["correct"] is False and by["tile=64"]["chosen"] is False
    assert by["tile=64"]["ms"] < by["tile=32"]["ms"]  # the wrong one was the fastest
    assert by["tile=8"]["status"] == "error" and "does not compile" in by["tile=8"]["note"]
    assert by["tile=8"]["chosen"] is False
    chosen = [r for r in rows if r["chosen"]]
    assert [r["candidate"] for r in chosen] == ["tile=32"]
    assert chosen[0]["vs_default"] > 1
    table = tune.table_json(rows, info, "x.csv", cfg.min_gain)
    # rows shorter than the shortest tuned one keep the defaults (the
    # heuristics would take the first entry down to n = 0)
    below, entry = table["ops"]["softmax"]["2"]
    assert below["n"] == 1 and below["limits"] == {}
    assert entry["n"] == 256 and entry["limits"] == {"tile": 32}
    assert table["meaningless"] is True and table["slug"] == "cpu"


def test_a_candidate_with_an_unknown_field_is_an_error_row(tile_clock):
    space = tune.Space(table_op="softmax", perf_op="softmax_fwd", paths=tune.SOFTMAX.paths,
                       axes=(tune.Axis("no_such_field", (1,)), tune.Axis("tile", (8192,))),  # 32 on CPU
                       plan=tune.SOFTMAX.plan)
    cfg = tune.TuneConfig(device="cpu", spaces=[space], ns=(256,), m=8, rep_ms=1,
                          copy_bytes=1 << 16)
    rows = tune.run_tuning(cfg, _cpu_info(), provider=FakeSoftmax(), log=lambda s: None)
    by = {r["candidate"]: r for r in rows[1:]}
    assert by["no_such_field=1"]["status"] == "error" and not by["no_such_field=1"]["chosen"]
    assert "unplanned" in by["no_such_field=1"]["plan"]
    assert by["tile=32"]["chosen"] is True, [
        (r["candidate"], r["status"], r["correct"], r["ms"], r["chosen"], r["note"][:80])
        for r in rows[1:]]


def test_choice_keeps_the_defaults_within_min_gain_and_none_when_all_wrong():
    def row(name, ms, correct=True, status="ok"):
        return {"op": "softmax_fwd", "table_op": "softmax", "M": 8, "N": 64, "candidate": name,
                "ms": ms, "correct": correct, "status": status, "fields": "{}",
                "vs_default": math.nan}

    rows = [row("default", 1.00), row("a", 0.99), row("b", 0.50, correct=False)]
    (best,) = tune.choose(rows, 0.02).values()
    assert best["candidate"] == "default"
    rows = [row("default", 1.00), row("a", 0.97)]
    (best,) = tune.choose(rows, 0.02).values()
    assert best["candidate"] == "a" and best["vs_default"] == pytest.approx(1 / 0.97)
    rows = [row("default", 1.0, correct=False), row("a", 2.0, status="error")]
    assert list(tune.choose(rows, 0.02).values()) == [None]
    rows = [row("default", 1.0, status="error"), row("a", 2.0)]
    (best,) = tune.choose(rows, 0.02).values()
    assert best["candidate"] == "a"  # the defaults failed: the fastest correct one
    # a gain within the timings' spread is noise: the 80th percentile of the
    # candidate must be below the 20th of the default
    noisy = [dict(row("default", 1.00), ms_p20=0.95, ms_p80=1.05),
             dict(row("a", 0.96), ms_p20=0.90, ms_p80=0.99)]
    (best,) = tune.choose(noisy, 0.02).values()
    assert best["candidate"] == "default"
    clear = [dict(row("default", 1.00), ms_p20=0.99, ms_p80=1.01),
             dict(row("a", 0.96), ms_p20=0.955, ms_p80=0.97)]
    (best,) = tune.choose(clear, 0.02).values()
    assert best["candidate"] == "a"


def test_time_limit_skips_the_rest_and_still_chooses(tile_clock):
    cfg = tune.TuneConfig(device="cpu", spaces=[tune.SOFTMAX], ns=(256,), m=8, rep_ms=1,
                          copy_bytes=1 << 16, time_limit=0.0)
    rows = tune.run_tuning(cfg, _cpu_info(), provider=FakeSoftmax(), log=lambda s: None)
    assert all(r["status"] == "skipped" and "time limit" in r["note"] for r in rows[1:])
    assert "CUT SHORT" in rows[0]["note"]
    assert not any(r["chosen"] for r in rows)


def test_an_interrupt_between_candidates_still_records_every_candidate(tile_clock):
    """Ctrl-C landing outside a measurement (here in the log line after the
    first candidate): that candidate's row stays, every other is ``skipped``."""
    cfg = tune.TuneConfig(device="cpu", spaces=[tune.SOFTMAX], ns=(256,), m=8, rep_ms=1,
                          copy_bytes=1 << 16)
    expected = len(tune.candidates(tune.SOFTMAX, cfg.shapes(tune.SOFTMAX)[0], "cpu", cfg.base(),
                                   cfg.scale, cfg.max_candidates))
    assert expected > 1

    def log(line):
        if "of copy" in line:
            raise KeyboardInterrupt

    rows = tune.run_tuning(cfg, _cpu_info(), provider=FakeSoftmax(), log=log)
    ours = rows[1:]
    assert len(ours) == expected, [r["candidate"] for r in ours]
    assert len({r["candidate"] for r in ours}) == expected
    assert ours[0]["status"] == "ok"
    assert all(r["status"] == "skipped" and "interrupted" in r["note"] for r in ours[1:])
    assert "CUT SHORT" in rows[0]["note"]


def test_tune_command_end_to_end_on_cpu(tmp_path):
    """python -m perf.tune on CPU: Triton's interpreter, tiny shapes, the
    MEANINGLESS banner, every file, and nothing written to softmax_gpu/tuned/."""
    installed_before = sorted(os.listdir(tune.INSTALL_DIR)) if tune.INSTALL_DIR.exists() else []
    envv = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "perf.tune", "--device", "cpu", "--out", str(tmp_path),
           "--n", "64", "--m", "4", "--rep-ms", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=envv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MEANINGLESS" in proc.stdout and "can never be installed" in proc.stdout
    names = sorted(os.listdir(tmp_path))
    date = next(n for n in names if n.endswith("_tune.csv")).split("_")[1]
    stem = f"cpu_{date}_tune"
    assert names == sorted([f"{stem}.csv", f"{stem}_summary.md", "tuned_cpu.json"] +
                           [f"{stem}_{op}.png" for op in tune.SPACES])
    with open(tmp_path / f"{stem}.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == tune.TUNE_COLUMNS
        rows = list(reader)
    assert rows[0]["op"] == "copy"
    ours = rows[1:]
    assert {r["op"] for r in ours} == {"softmax_fwd", "ce_fwd_bwd", "softmax_fwd_bwd",
                                       "log_softmax_fwd"}
    assert all(r["status"] == "ok" and r["correct"] == "True" and float(r["ms"]) > 0 for r in ours)
    assert all(r["kernels"] and r["device"].startswith("cpu") for r in ours)
    sm = [r for r in ours if r["op"] == "softmax_fwd"]
    assert len(sm) >= 3 and {"default", "looped"} <= {r["candidate"] for r in sm}
    assert any("looped" in r["kernels"] for r in sm) and any("single" in r["kernels"] for r in sm)
    assert sum(r["chosen"] == "True" for r in sm) == 1
    table = json.loads((tmp_path / "tuned_cpu.json").read_text())
    assert table["meaningless"] is True and set(table["ops"]) == set(tune.SPACES)
    # the kinds tuned at one length end there: longer rows keep the defaults,
    # and so do shorter ones
    for op in ("softmax_backward", "log_softmax"):
        entries = table["ops"][op]["2"]
        assert [e["n"] for e in entries] == [1, 64, tune.SPACES[op].upto], entries
        assert entries[0]["limits"] == entries[-1]["limits"] == {}
    assert [e["n"] for e in table["ops"]["softmax"]["2"]] == [1, 64]
    assert "MEANINGLESS" in (tmp_path / f"{stem}_summary.md").read_text()
    after = sorted(os.listdir(tune.INSTALL_DIR)) if tune.INSTALL_DIR.exists() else []
    assert after == installed_before


# --- install --------------------------------------------------------------------


def test_install_refuses_cpu_results_and_invalid_tables(tmp_path, capsys):
    dest = tmp_path / "tuned"
    cpu = tmp_path / "tuned_cpu.json"
    cpu.write_text(json.dumps(_table(GOOD, slug="cpu") | {"meaningless": True}))
    assert tune.main(["--install", str(cpu), "--install-dir", str(dest)]) == 2
    assert "CPU run" in capsys.readouterr().err
    assert not dest.exists()
    bad = tmp_path / f"tuned_{FAKE_SLUG}.json"
    bad.write_text(json.dumps(_table({"softmax": {"2": [{"n": 4096, "limits": {"tile": 3}}]}})))
    assert tune.main(["--install", str(bad), "--install-dir", str(dest)]) == 2
    assert "'tile'" in capsys.readouterr().err and not dest.exists()
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_table(GOOD)))
    assert tune.main(["--install", str(good), "--install-dir", str(dest)]) == 0
    assert json.loads((dest / f"{FAKE_SLUG}.json").read_text())["ops"] == GOOD


# --- device_check.sh --------------------------------------------------------------


def _dry_run(out: Path, **extra) -> subprocess.CompletedProcess:
    # no carried wheels (a developer's .whl/ must not change the plan)
    envv = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable,
            "WHEEL_DIR": str(out / "no-wheels"), **extra}
    envv.pop("OUT", None)
    return subprocess.run(["bash", str(ROOT / "perf" / "device_check.sh"), str(out)], cwd=ROOT,
                          env=envv, capture_output=True, text=True, timeout=120)


def _check_output_limits(out: Path) -> list[str]:
    """The device tool's limits: at most 8 files, no more than 2 folders
    down, names of letters, digits, '.', '_' and '-', 16 MiB each."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, sorted(map(str, files))
    for p in out.rglob("*"):
        rel = p.relative_to(out)
        assert len(rel.parts) <= 3, rel
        assert re.fullmatch(r"[A-Za-z0-9._-]+", p.name), p.name
    assert all(p.stat().st_size <= 16 << 20 for p in files)
    return sorted(p.name for p in files)


def test_device_check_output_limits_and_budget(tmp_path):
    proc = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = _check_output_limits(tmp_path)
    assert {"device_check.log", "device_check_summary.md", "extras.tar.gz"} <= set(names)
    assert any(n.startswith("tuned_") and n.endswith(".json") for n in names)
    assert sum(n.endswith(".csv") for n in names) == 4  # tuning, linear CE, host, profile
    with tarfile.open(tmp_path / "extras.tar.gz") as tar:
        packed = tar.getnames()
    assert "stray/a/b/deep.txt" in packed and any(n.endswith(".png") for n in packed)
    assert any(n.endswith("_profile.csv") for n in names) and "train_tiny_llama.json" in packed
    assert "tests_junit.xml" in packed
    # every step ran to its full limit (simulated): still within the budget
    summary = (tmp_path / "device_check_summary.md").read_text()
    found = re.search(r"(\d+)s in all \(budget (\d+)s\)", summary)
    total, budget = int(found.group(1)), int(found.group(2))
    # under 8 minutes with one step's kill grace, and a warm rerun after a
    # 1.5-minute start still inside 15 minutes of device time
    assert total <= budget and budget + 10 <= 480 and 90 + 2 * (budget + 10) <= 900
    steps = re.findall(r"^\| (\w+) \| ok \| (\d+)s \| (\d+)s \|", summary, re.M)
    assert [s[0] for s in steps] == ["install", "info", "gpu_checks", "tune", "tests", "profile",
                                     "linear_ce", "host", "llama"]
    assert all(int(limit) >= 10 for _, _, limit in steps)
    # the quick sweep is left to a second call, and that is no failure
    assert "| perf_quick | not run (a second call" in summary


def test_device_check_installs_carried_wheels(tmp_path):
    """With wheels carried in .whl/ the wheels step runs (its limit once fell
    below the least time a step is given, so it was never run)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "peer-1.0-py3-none-any.whl").write_bytes(b"")
    proc = _dry_run(tmp_path / "out", WHEEL_DIR=str(wheels))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (tmp_path / "out" / "device_check_summary.md").read_text()
    assert re.search(r"^\| wheels \| ok \|", summary, re.M), summary
    assert int(re.search(r"(\d+)s in all", summary).group(1)) <= 395


def test_device_check_second_call_runs_the_quick_sweep(tmp_path):
    """The header's second call: the quick sweep alone, in the same budget."""
    proc = _dry_run(tmp_path, SKIP_STEPS="gpu_checks tune tests profile linear_ce host llama")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (tmp_path / "device_check_summary.md").read_text()
    found = re.search(r"^\| perf_quick \| ok \| (\d+)s \| (\d+)s \|", summary, re.M)
    assert found and int(found.group(2)) >= 200, summary
    assert int(re.search(r"(\d+)s in all", summary).group(1)) <= 395
    names = _check_output_limits(tmp_path)
    assert sum(n.endswith(".csv") for n in names) == 1  # the sweep


def test_device_check_short_budget_drops_late_steps_within_limits(tmp_path):
    proc = _dry_run(tmp_path, BUDGET="200")
    assert proc.returncode == 1  # steps that got no time count as failures
    summary = (tmp_path / "device_check_summary.md").read_text()
    assert "NOT RUN (no time left)" in summary
    assert int(re.search(r"(\d+)s in all", summary).group(1)) <= 200
    _check_output_limits(tmp_path)


def test_long_warps_sets_the_long_row_kernels_warps_only():
    import torch

    from softmax_gpu.cross_entropy import cross_entropy_config
    from softmax_gpu.softmax import softmax_config

    cpu = torch.device("cpu")
    with heuristics.override(sm_count=132, long_warps=4):
        assert softmax_config(4096, 65536, 2, cpu, coop=True).num_warps == 4
        assert cross_entropy_config(4096, 128256, 2, cpu).num_warps == 4
        assert softmax_config(4096, 1024, 2, cpu).path == "single"  # on chip: unchanged
    with heuristics.override(sm_count=132):
        assert softmax_config(4096, 65536, 2, cpu, coop=True).num_warps == 8
        assert cross_entropy_config(4096, 128256, 2, cpu).num_warps == 8
        default = cross_entropy_config(4096, 128256, 2, cpu).regs
    # 4 warps hold 32 elements each of a 4096 tile, 16 warps share it: the
    # budgets under which they compile without a spill (the default's spilled
    # at sm_90), within what 16 warps can have
    with heuristics.override(sm_count=132, long_warps=4):
        assert cross_entropy_config(4096, 128256, 2, cpu).regs == heuristics.WIDE_THREAD_REGS
        assert softmax_config(4096, 65536, 2, cpu, coop=True).regs == heuristics.WIDE_THREAD_REGS
    with heuristics.override(sm_count=132, long_warps=16):
        assert cross_entropy_config(4096, 128256, 2, cpu).regs == heuristics.MANY_WARPS_REGS
        assert heuristics.MANY_WARPS_REGS * 32 * 16 <= heuristics.REGISTERS_PER_SM
    assert default < heuristics.MANY_WARPS_REGS
    # the tuner's long_warps axis is the one the static check compiles
    axis = next(a for a in tune.LONG_AXES if a.field == "long_warps")
    assert tuple(axis.values) == heuristics.LONG_WARPS_CHOICES
