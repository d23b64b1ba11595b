"""SASS instruction counts per element of the hot kernels, for sm_90, on the CPU.

    python -m perf.sass            # markdown table to stdout
    python -m perf.sass --json     # the same numbers as JSON

Each hot kernel is compiled exactly as ``perf/static.py`` compiles it (the
heuristics' configuration for the hot shape, a real call's specialisation,
fp fusion as launched) and disassembled with the ``cuobjdump`` in Triton's
wheel. Counted:

- looped kernels (looped, persistent and cooperative paths): each tile
  loop's body, i.e. the instructions from a backward branch's target up to
  that branch, for the loops that load from global memory (the first is the
  online (max, sum) pass, the second the normalise / gradient pass, in
  program order; a cooperative kernel's spin-wait and partial-merge loops
  are not tile loops: only loops with 16-byte loads count when there are
  any), divided by the
  elements a thread handles per iteration (BLOCK_N / (32 x warps), times the
  unrolling ptxas applied, read off the 16-byte loads);
- single kernels: the whole kernel (no NOPs, no trailing self-branch) over
  the elements a thread owns (BLOCK_N x ROWS / (32 x warps)).

These are static counts: a branch inside the body counts both sides once.
Besides instructions per element: MUFU operations (EX2, RCP, LG2, ...),
global loads and stores by width (LDG.E.128 is 16 bytes, LDG.E.U16 2 bytes),
barriers (BAR) and warp shuffles (SHFL) in the counted range.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import subprocess
import sys
import tempfile

from perf import static

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_TARGET = re.compile(r"\b(0x[0-9a-f]+)\s*$")


@dataclasses.dataclass(frozen=True)
class Hot:
    """A hot kernel at a hot shape."""

    name: str  # row label
    kernel: str
    dtype: str
    flags: tuple  # ((constexpr, value), ...) beyond the configuration's
    config: tuple  # ("softmax" | "cross_entropy", M, N, elem_bytes, call kind or extras)
    aligned: bool = True  # ints divisible by 16 (False: rows like 50257, see perf/static.py)
    limits: tuple = ()  # ((Limits field, value), ...) under which the config is picked


_EVICT = (("EVICT", True),)
_CE = (("HAS_WEIGHT", False), ("SMOOTH", False), ("SOFTCAP", False), ("WRITE_GRAD", True),
       ("WRITE_HIT", False))
_PERSISTENT = (("long_path", "persistent"),)

HOT = (
    Hot("softmax fwd, single, bf16, N=4096", "softmax_fwd_single_kernel", "bf16",
        (("LOG", False),), ("softmax", 16384, 4096, 2, "fwd")),
    Hot("softmax fwd, single, bf16, N=32768", "softmax_fwd_single_kernel", "bf16",
        (("LOG", False),), ("softmax", 16384, 32768, 2, "fwd")),
    Hot("softmax fwd, looped, bf16, N>=65536", "softmax_fwd_looped_kernel", "bf16",
        (("LOG", False),) + _EVICT, ("softmax", 4096, 262144, 2, "fwd"), limits=_PERSISTENT),
    Hot("softmax fwd, coop, bf16, N>=65536", "softmax_fwd_coop_kernel", "bf16",
        (("LOG", False),) + _EVICT, ("softmax", 4096, 262144, 2, "fwd")),
    Hot("softmax bwd, looped, bf16, N>=32768", "softmax_bwd_looped_kernel", "bf16",
        (("LOG", False),) + _EVICT, ("softmax", 4096, 65536, 2, "bwd"), limits=_PERSISTENT),
    Hot("softmax bwd, coop, bf16, N>=32768", "softmax_bwd_coop_kernel", "bf16",
        (("LOG", False),) + _EVICT, ("softmax", 4096, 65536, 2, "bwd")),
    Hot("CE class + grad, single, bf16, C=16384", "ce_class_single_kernel", "bf16", _CE,
        ("cross_entropy", 16384, 16384, 2, False)),
    Hot("CE class + grad, looped, bf16, C>=32000", "ce_class_looped_kernel", "bf16",
        _CE + _EVICT, ("cross_entropy", 16384, 128256, 2, False), limits=_PERSISTENT),
    Hot("CE class + grad, coop, bf16, C>=32000", "ce_class_coop_kernel", "bf16",
        _CE + _EVICT, ("cross_entropy", 16384, 128256, 2, False)),
    Hot("CE class + grad, looped, bf16, C=50257 (unaligned)", "ce_class_looped_kernel", "bf16",
        _CE + _EVICT, ("cross_entropy", 16384, 50257, 2, False), aligned=False,
        limits=_PERSISTENT),
    Hot("CE class + grad, looped, 3 stages, bf16, C>=32000", "ce_class_looped_kernel", "bf16",
        _CE + _EVICT, ("cross_entropy", 16384, 128256, 2, False),
        limits=_PERSISTENT + (("long_stages", 3),)),
    Hot("CE class + grad, single, 16 per thread, bf16, C=4096", "ce_class_single_kernel", "bf16",
        _CE, ("cross_entropy", 131072, 4096, 2, False), limits=(("ce_single_ept", 16),)),
    Hot("CE class + grad, single, 32 per thread, bf16, C=4096", "ce_class_single_kernel", "bf16",
        _CE, ("cross_entropy", 131072, 4096, 2, False), limits=(("ce_single_ept", 32),)),
    Hot("CE class + grad, single, bf16, C=4096", "ce_class_single_kernel", "bf16", _CE,
        ("cross_entropy", 131072, 4096, 2, False)),
    Hot("CE class, loss only, single, bf16, C=4096", "ce_class_single_kernel", "bf16",
        _CE[:3] + (("WRITE_GRAD", False), ("WRITE_HIT", False)),
        ("cross_entropy", 131072, 4096, 2, False)),
)


def hot_variants() -> list:
    """(Hot, Variant) for each hot kernel: the static variant with the
    configuration the heuristics pick at the hot shape (132 SMs)."""
    import torch

    from softmax_gpu import heuristics

    fns = static.config_functions()
    everything = static.all_variants()
    out = []
    for h in HOT:
        with heuristics.override(sm_count=132, **dict(h.limits)):
            op, M, N, elem, extra = h.config
            if op == "softmax":
                cfg = fns.call_config(extra, M, N, elem, torch.device("cpu"))
            else:
                cfg = fns.cross_entropy_config(M, N, elem, torch.device("cpu"), extra)
            want = dict(h.flags, BLOCK_N=cfg.block_n)
            if cfg.path == heuristics.SINGLE:
                want["ROWS"] = cfg.rows_per_program
            else:
                want["STAGES"] = cfg.stages
            match = [v for v in everything
                     if v.kernel == h.kernel and v.dtype == h.dtype and v.num_warps == cfg.num_warps
                     and want.items() <= dict(v.constexprs).items()]
            if len(match) != 1:
                raise LookupError(f"{h.name}: {len(match)} static variants match {want}")
            out.append((h, match[0]))
    return out


def disassemble(cubin: bytes) -> list:
    """[(address, instruction text without predicate noise)] of a cubin's SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([static._triton_tool("cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2)) for m in map(_INSTR.match, text.splitlines()) if m]


def opcode(ins: str) -> str:
    """The opcode with its modifiers (``LDG.E.128``), predicate dropped."""
    parts = ins.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def loops(code: list) -> list:
    """[(start index, end index)] of the bodies closed by backward branches
    (innermost first when nested), in program order."""
    index = {addr: i for i, (addr, _) in enumerate(code)}
    found = []
    for i, (addr, ins) in enumerate(code):
        if opcode(ins).startswith("BRA"):
            m = _TARGET.search(ins)
            if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in index:
                found.append((index[int(m.group(1), 16)], i))
    inner = [lp for lp in found if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1]
                                           for o in found)]
    return sorted(inner)


def _real(code: list) -> list:
    """Instructions without NOPs and the trailing branch-to-self."""
    out = [(a, ins) for a, ins in code if opcode(ins) != "NOP"]
    while out and opcode(out[-1][1]).startswith("BRA") and _TARGET.search(out[-1][1]) \
            and int(_TARGET.search(out[-1][1]).group(1), 16) == out[-1][0]:
        out.pop()
    return out


def count(body: list, elems: float) -> dict:
    """Counts of one code range; ``elems``: elements per thread it handles."""
    ops = collections.Counter(opcode(ins) for _, ins in body)

    def total(prefix):
        return sum(n for op, n in ops.items() if op.split(".")[0] == prefix)

    return dict(
        instructions=len(body), elems_per_thread=elems,
        instr_per_elem=round(len(body) / elems, 2),
        mufu={op: n for op, n in sorted(ops.items()) if op.startswith("MUFU")},
        ldg={op: n for op, n in sorted(ops.items()) if op.startswith("LDG")},
        stg={op: n for op, n in sorted(ops.items()) if op.startswith("STG")},
        bar=total("BAR"), shfl=total("SHFL"),
    )


def _unroll(body: list, per_iter: float, elem_bytes: int, tensors: int) -> int:
    """How many tile iterations one pass through ``body`` covers: an
    iteration loads ``tensors`` data tensors, per_iter x elem_bytes / 16
    16-byte loads each; ptxas unrolls simple loops (a multiple of that)."""
    wide = sum(1 for _, ins in body if opcode(ins).startswith("LDG") and opcode(ins).endswith(".128"))
    per = max(1, round(per_iter * elem_bytes / 16)) * tensors
    return max(1, wide // per) if wide % per == 0 and wide else 1


def analyse(asm: dict, v) -> dict:
    """Per-element counts of ``v``'s cubin (``asm["cubin"]``): each tile loop of
    a looped kernel, the whole kernel of a single one (run in static's compile
    workers)."""
    code = _real(disassemble(asm["cubin"]))
    c = dict(v.constexprs)
    per_iter = c["BLOCK_N"] * c.get("ROWS", 1) / (32 * v.num_warps)
    body = loops(code)
    if "ROWS" in c:  # single path: the whole kernel
        return dict(kind="kernel", parts=[count(code, per_iter)], loops_found=len(body))
    def loads(a, b, wide):
        return any(opcode(ins).startswith("LDG") and (not wide or opcode(ins).endswith(".128"))
                   for _, ins in code[a:b + 1])

    # tile loops: those with 16-byte loads (a cooperative kernel's spin-wait
    # and partial-merge loops have none), else any loop that loads
    wide = any(loads(a, b, True) for a, b in body)
    tiles = [(a, b) for a, b in body if loads(a, b, wide)]
    if not tiles:
        return {"error": "no tile loop found in a looped kernel"}
    elem = {"bf16": 2, "fp32": 4, "fp64": 8}[v.dtype]
    tensors = 2 if v.kernel.startswith("softmax_bwd") else 1  # y and dy; else x
    parts = []
    for a, b in tiles:
        parts.append(count(code[a:b + 1],
                           per_iter * _unroll(code[a:b + 1], per_iter, elem, tensors)))
    return dict(kind="loop", parts=parts, loops_found=len(body))


_LOC = re.compile(r"\.loc\s+(\d+)\s+(\d+)\s+(\d+)(?:.*inlined_at\s+(\d+)\s+(\d+)\s+(\d+))?")
_LABEL = re.compile(r"^(\$\w+):")
_BRANCH = re.compile(r"^(@!?%\w+\s+)?bra(?:\.uni)?\s+(\$\w+);")


def ptx_ops(ptx: str) -> list:
    """(index, op, frames) of each global read ("ld.global"), global write
    ("st.global") and CTA barrier ("bar.sync") of ``ptx`` (see ``_access``):
    ``frames`` are the ``file.py:line`` of the innermost ``.loc`` and of
    every call site it is inlined at, followed up the ``inlined_at``
    of the ``.loc`` directives (LLVM writes each call site's own first), and
    read off the ``@[ ... ]`` comment where LLVM writes one."""
    lines = ptx.splitlines()
    files = {m.group(1): m.group(2).rsplit("/", 1)[-1]
             for m in (re.match(r'\s*\.file\s+(\d+)\s+"([^"]+)"', ln) for ln in lines) if m}
    chains, frames, out = {}, (), []
    for i, line in enumerate(lines):
        s = line.strip()
        m = _LOC.match(s)
        if m:
            f, ln, col, pf, pln, pcol = m.groups()
            parent = ()
            if pf:
                parent = chains.get((pf, pln, pcol)) or chains.get((pf, pln)) or (
                    f"{files.get(pf, pf)}:{pln}",)
            comment = re.findall(r"([\w.]+\.py:\d+):\d+", s.split("//", 1)[1]) if "//" in s else []
            frames = tuple(dict.fromkeys((f"{files.get(f, f)}:{ln}",) + parent + tuple(comment)))
            chains[(f, ln, col)] = chains[(f, ln)] = frames
            continue
        op = _access(s)
        if op is not None:
            out.append((i, op, frames))
    return out


# PTX instructions by what they do to global memory, for barrier_between: a
# CTA barrier (bar / barrier, .sync or .red, with or without .cta; an
# arrive does not wait); a write (st; red and atom in any space but shared,
# whatever the order of their qualifiers: a read-modify-write counts as both;
# a bulk copy from shared to global, TMA's store); a read (ld, cp.async and
# its bulk and tensor forms from global). Instruction text only: comments and
# directives are not.
_BARRIER = re.compile(r"^(@!?%\w+\s+)?(bar|barrier)(\.cta)?\.(sync|red)\b")
_WRITE = re.compile(r"\b(st\.global|(atom|red)\.(?![\w.:]*\bshared\b)|"
                    r"cp\.async\.bulk(\.tensor\.\w+)?\.global\.shared)")
_READ = re.compile(r"\b(ld\.global|cp\.async\S*\.shared\S*\.global)")


def _access(s: str):
    """"bar.sync", "st.global" (a write) or "ld.global" (a read) for a PTX
    line that is one of those kinds, else None."""
    if not s or s.startswith(("//", ".")):
        return None
    if _BARRIER.match(s):
        return "bar.sync"
    if _WRITE.search(s):
        return "st.global"
    if _READ.search(s):
        return "ld.global"
    return None


def _successors(lines: list) -> list:
    """The next lines control can reach from each line of a PTX function:
    the following line, and a branch's target (an unpredicated branch, ret
    and exit: only the target, or nothing)."""
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := _LABEL.match(ln.strip()))}
    succ = []
    for i, ln in enumerate(lines):
        s = ln.strip()
        b = _BRANCH.match(s)
        nxt = [i + 1] if i + 1 < len(lines) else []
        if b:
            succ.append([labels[b.group(2)]] + (nxt if b.group(1) else []))
        elif re.match(r"^(ret|exit);", s):
            succ.append([])
        else:
            succ.append(nxt)
    return succ


def barrier_between(asm: dict, v, where: dict) -> list:
    """For each (first, then) pair of ``where[v.kernel]`` (two statements'
    ``file.py:first-last`` lines: a call's location is one of its lines,
    which one depends on the Triton version; a frame matches the code
    inlined there too): whether every path of ``v``'s PTX from a global
    access (load or store) of the first to a global store of the second
    passes a CTA barrier (run in static's compile workers). Returns, per
    pair, the accesses and stores found and the stores that some access
    reaches with no ``bar.sync`` on the way (``unguarded``)."""
    ops = ptx_ops(asm["ptx"])
    barriers = {i for i, op, _ in ops if op == "bar.sync"}
    succ, out = _successors(asm["ptx"].splitlines()), []

    def at(span: str):  # "file.py:first-last" -> whether a frame list falls in it
        name, first, last = re.match(r"(.+):(\d+)-(\d+)$", span).groups()
        inside = {f"{name}:{n}" for n in range(int(first), int(last) + 1)}
        return lambda frames: not inside.isdisjoint(frames)

    for first_at, then_at in where[v.kernel]:
        in_first, in_then = at(first_at), at(then_at)
        starts = [i for i, op, f in ops if op != "bar.sync" and in_first(f)]
        stores = {i for i, op, f in ops if op == "st.global" and in_then(f)}
        seen, unguarded = set(), set()
        todo = [j for i in starts for j in succ[i]]
        while todo:
            i = todo.pop()
            if i in seen or i in barriers:
                continue
            seen.add(i)
            if i in stores:
                unguarded.add(i)
            todo.extend(succ[i])
        out.append(dict(first=first_at, then=then_at, accesses=len(starts), stores=len(stores),
                        unguarded=sorted(unguarded)))
    return out


def run(jobs: int = 2) -> list:
    """[(Hot, Variant, analysis)] for every hot kernel."""
    pairs = hot_variants()
    res = {}
    for aligned in (True, False):
        vs = [v for h, v in pairs if h.aligned == aligned]
        if vs:
            res[aligned] = dict(static.run(jobs, vs, aligned_ints=aligned, analyse=analyse))
    return [(h, v, res[h.aligned][v]) for h, v in pairs]


def _widths(d: dict) -> str:
    return " ".join(f"{n}x{op}" for op, n in d.items()) or "-"


def markdown(rows) -> str:
    import triton

    out = [f"SASS per element, sm_90, Triton {triton.__version__} (python -m perf.sass)", "",
           "| kernel | config | counted | instr | elems/thread | instr/elem | MUFU | "
           "global loads | global stores | BAR | SHFL |",
           "|---|---|---|---:|---:|---:|---|---|---|---:|---:|"]
    for h, v, a in rows:
        c = dict(v.constexprs)
        cfg = f"BLOCK_N={c['BLOCK_N']}" + (f" ROWS={c['ROWS']}" if "ROWS" in c else "") + \
            f" warps={v.num_warps}"
        if "error" in a:
            out.append(f"| {h.name} | {cfg} | ERROR: {a['error'][:80]} | | | | | | | | |")
            continue
        for i, p in enumerate(a["parts"]):
            what = "kernel" if a["kind"] == "kernel" else f"loop {i + 1} of {len(a['parts'])}"
            out.append(f"| {h.name} | {cfg} | {what} | {p['instructions']} | "
                       f"{p['elems_per_thread']:g} | {p['instr_per_elem']} | {_widths(p['mufu'])} | "
                       f"{_widths(p['ldg'])} | {_widths(p['stg'])} | {p['bar']} | {p['shfl']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.sass", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = run(args.jobs)
    if args.json:
        print(json.dumps([dict(name=h.name, kernel=v.kernel, constexprs=dict(v.constexprs),
                               num_warps=v.num_warps, **a) for h, v, a in rows], indent=1))
    else:
        print(markdown(rows))
    return 1 if any("error" in a for _, _, a in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
