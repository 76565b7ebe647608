"""``mojo-opset compare`` reports: the readable table, JSON (schema in docs/cli.md) and JUnit XML."""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field

from .compare_cases import Case
from .served import Served, short
from .table import WIDTH, fmt_num, render, wrap_lines


@dataclass
class Result:
    case: Case
    backend: str
    status: str                                   # PASS | FAIL | SKIP
    served_by: str = "no override"                # the case op's own: kernel | fallback | no override
    reasons: list = field(default_factory=list)   # why a kernel did not serve: "op: reason"
    details: list = field(default_factory=list)   # failures, skip reason, accepted near-ties
    max_abs: float | None = None
    max_rel: float | None = None
    mismatch: float | None = None
    tolerance: dict | None = None
    seconds: float = 0.0
    served: Served | None = None                  # the op and every part it went through

    def name(self) -> str:
        c = self.case
        return f"{c.op} [{self.backend}] {c.dtype_name} {c.shape_str()} {c.options_str()}"

    def parts_text(self) -> str:
        return self.served.parts_text() if self.served is not None and self.status != "SKIP" else ""

    def to_json(self) -> dict:
        def num(v):
            return None if v is None or not math.isfinite(v) else v
        c = self.case
        return {"op": c.op, "backend": self.backend, "dtype": c.dtype_name, "shape": dict(c.shape),
                "options": dict(c.options), "served_by": self.served_by,
                "served": dict(self.served.records) if self.served is not None else {},
                "reasons": list(self.reasons) + list(self.details),
                "max_abs": num(self.max_abs), "max_rel": num(self.max_rel), "mismatch": num(self.mismatch),
                "tolerance": self.tolerance, "status": self.status}


def _g(v: float) -> str:
    """The shorter of 0.001 and 1e-3."""
    plain, sci = f"{v:.2g}", f"{v:.1e}".replace(".0e", "e").replace("e-0", "e-").replace("e+0", "e")
    return plain if len(plain) <= len(sci) else sci


def _tol_str(t: dict | None) -> str:
    if not t:
        return "-"
    if t["atol"] == 0 and t["rtol"] == 0:
        return "exact"
    s = f"{_g(t['atol'])}/{_g(t['rtol'])}"
    return s + (f" <={_g(t['max_mismatch'])}" if t.get("max_mismatch") else "")


_DTYPE_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def render_table(results: list[Result], width: int = WIDTH) -> str:
    """One section per backend, one row per case, and under a case whose op went through other
    dispatched ops (the forward: gating, permute, experts, combine) how each of those was served.
    Options and the tolerance wrap to keep within ``width``; max_rel and the mismatch ratio are in
    the JSON report."""
    out = []
    for backend in dict.fromkeys(r.backend for r in results):
        mine = [r for r in results if r.backend == backend]
        rows = [[short(r.case.op), _DTYPE_SHORT.get(r.case.dtype_name, r.case.dtype_name), r.case.shape_str(),
                 r.case.options_str().replace(",", ", "), "-" if r.status == "SKIP" else r.served_by,
                 fmt_num(r.max_abs), _tol_str(r.tolerance), r.status] for r in mine]
        notes = [f"parts: {r.parts_text()}" if r.parts_text() else None for r in mine]
        out += ["", f"{backend} ({len(rows)} cases)",
                render(["op", "dtype", "shape", "options", "served by", "max_abs", "atol/rtol", "status"], rows,
                       right={5}, width=width, wrap={3, 6}, notes=notes, note_indent=9)]
    return "\n".join(out[1:])


def render_summary(results: list[Result], elapsed: float, width: int = WIDTH) -> str:
    lines = []
    fails = [r for r in results if r.status == "FAIL"]
    if fails:
        lines += ["", f"FAILURES ({len(fails)})"]
        for r in fails:
            lines += wrap_lines(r.name(), width, 2)
            lines += [ln for why in r.details for ln in wrap_lines(why, width, 6)]
            lines += wrap_lines(f"served by: {r.served.label() if r.served else r.served_by}", width, 6)
            lines += [ln for why in r.reasons for ln in wrap_lines(f"(fallback) {why}", width, 6)]
    fb = Counter()
    for r in results:
        if r.status != "SKIP":
            for why in r.reasons:   # the case op's and its parts' fallbacks
                fb[(r.backend, why)] += 1
    if fb:
        lines += ["", "fallbacks to the reference (backend: op: reason -> cases)"]
        lines += [ln for (be, why), n in sorted(fb.items()) for ln in wrap_lines(f"{be}: {why} -> {n}", width, 2)]
    skips = Counter((r.backend, r.details[0] if r.details else "") for r in results if r.status == "SKIP")
    if skips:
        lines += ["", "skipped (backend: reason -> cases)"]
        lines += [ln for (be, why), n in sorted(skips.items()) for ln in wrap_lines(f"{be}: {why} -> {n}", width, 2)]
    st = Counter(r.status for r in results)
    served = Counter(r.served_by for r in results if r.status != "SKIP")
    lines += [""] + wrap_lines(f"{len(results)} cases: {st['PASS']} passed, {st['FAIL']} failed, {st['SKIP']} "
                               f"skipped; served by kernel {served['kernel']}, fallback {served['fallback']}, "
                               f"no override {served['no override']}; {elapsed:.1f}s", width)
    return "\n".join(lines)


def write_json(path: str, environment: dict, results: list[Result]) -> None:
    data = {"environment": environment, "cases": [r.to_json() for r in results]}
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")


def write_junit(path: str, results: list[Result], elapsed: float) -> None:
    root = ET.Element("testsuites", name="mojo-opset compare", tests=str(len(results)),
                      failures=str(sum(r.status == "FAIL" for r in results)),
                      skipped=str(sum(r.status == "SKIP" for r in results)), time=f"{elapsed:.3f}")
    for backend in dict.fromkeys(r.backend for r in results):
        mine = [r for r in results if r.backend == backend]
        suite = ET.SubElement(root, "testsuite", name=f"mojo-opset compare [{backend}]", tests=str(len(mine)),
                              failures=str(sum(r.status == "FAIL" for r in mine)),
                              skipped=str(sum(r.status == "SKIP" for r in mine)),
                              time=f"{sum(r.seconds for r in mine):.3f}")
        for r in mine:
            c = r.case
            tc = ET.SubElement(suite, "testcase", classname=f"mojo_opset.compare.{backend}.{c.op}",
                               name=f"{c.dtype_name} {c.shape_str()} {c.options_str()}", time=f"{r.seconds:.3f}")
            props = ET.SubElement(tc, "properties")
            ET.SubElement(props, "property", name="served_by", value=r.served_by)
            if r.parts_text():
                ET.SubElement(props, "property", name="parts", value=r.parts_text())
            if r.max_abs is not None:
                ET.SubElement(props, "property", name="max_abs", value=fmt_num(r.max_abs))
            if r.status == "FAIL":
                f = ET.SubElement(tc, "failure", message=r.details[0] if r.details else "failed")
                f.text = "\n".join(r.details + [f"(fallback) {why}" for why in r.reasons])
            elif r.status == "SKIP":
                ET.SubElement(tc, "skipped", message=r.details[0] if r.details else "skipped")
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
