"""``mojo-opset compare`` reports: the readable table, JSON (SPEC §5 schema) and JUnit XML."""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field

from .compare_cases import Case
from .table import fmt_num, render


@dataclass
class Result:
    case: Case
    backend: str
    status: str                                   # PASS | FAIL | SKIP
    served_by: str = "no override"                # kernel | fallback | no override
    reasons: list = field(default_factory=list)   # why a kernel did not serve: "op: reason"
    details: list = field(default_factory=list)   # failures, skip reason, accepted near-ties
    max_abs: float | None = None
    max_rel: float | None = None
    mismatch: float | None = None
    tolerance: dict | None = None
    seconds: float = 0.0

    def name(self) -> str:
        c = self.case
        return f"{c.op} [{self.backend}] {c.dtype_name} {c.shape_str()} {c.options_str()}"

    def to_json(self) -> dict:
        def num(v):
            return None if v is None or not math.isfinite(v) else v
        c = self.case
        return {"op": c.op, "backend": self.backend, "dtype": c.dtype_name, "shape": dict(c.shape),
                "options": dict(c.options), "served_by": self.served_by, "reasons": list(self.reasons) + list(self.details),
                "max_abs": num(self.max_abs), "max_rel": num(self.max_rel), "mismatch": num(self.mismatch),
                "tolerance": self.tolerance, "status": self.status}


def _tol_str(t: dict | None) -> str:
    if not t:
        return "-"
    if t["atol"] == 0 and t["rtol"] == 0:
        return "exact"
    s = f"{t['atol']:g}/{t['rtol']:g}"
    return s + (f" <={t['max_mismatch']:g}" if t.get("max_mismatch") else "")


def render_table(results: list[Result]) -> str:
    rows = []
    for r in results:
        c = r.case
        rows.append([c.op, r.backend, c.dtype_name, c.shape_str(), c.options_str(),
                     "-" if r.status == "SKIP" else r.served_by,
                     fmt_num(r.max_abs), fmt_num(r.max_rel), fmt_num(r.mismatch), _tol_str(r.tolerance), r.status])
    return render(["op", "backend", "dtype", "shape", "options", "served_by", "max_abs", "max_rel", "mismatch",
                   "atol/rtol", "status"], rows, right={6, 7, 8})


def render_summary(results: list[Result], elapsed: float) -> str:
    lines = []
    fails = [r for r in results if r.status == "FAIL"]
    if fails:
        lines += ["", f"FAILURES ({len(fails)})"]
        for r in fails:
            lines.append(f"  {r.name()}")
            lines += [f"      {why}" for why in r.details]
            lines += [f"      (fallback) {why}" for why in r.reasons]
    fb = Counter()
    for r in results:
        if r.served_by == "fallback" and r.status != "SKIP":
            for why in r.reasons:
                fb[(r.backend, why)] += 1
    if fb:
        lines += ["", "fallbacks to the reference (backend: op: reason -> cases)"]
        lines += [f"  {be}: {why} -> {n}" for (be, why), n in sorted(fb.items())]
    skips = Counter((r.backend, r.details[0] if r.details else "") for r in results if r.status == "SKIP")
    if skips:
        lines += ["", "skipped (backend: reason -> cases)"]
        lines += [f"  {be}: {why} -> {n}" for (be, why), n in sorted(skips.items())]
    st = Counter(r.status for r in results)
    served = Counter(r.served_by for r in results if r.status != "SKIP")
    lines += ["", f"{len(results)} cases: {st['PASS']} passed, {st['FAIL']} failed, {st['SKIP']} skipped; "
              f"served by kernel {served['kernel']}, fallback {served['fallback']}, "
              f"no override {served['no override']}; {elapsed:.1f}s"]
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
            if r.max_abs is not None:
                ET.SubElement(props, "property", name="max_abs", value=fmt_num(r.max_abs))
            if r.status == "FAIL":
                f = ET.SubElement(tc, "failure", message=r.details[0] if r.details else "failed")
                f.text = "\n".join(r.details + [f"(fallback) {why}" for why in r.reasons])
            elif r.status == "SKIP":
                ET.SubElement(tc, "skipped", message=r.details[0] if r.details else "skipped")
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
