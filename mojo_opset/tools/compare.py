"""``mojo-opset compare``: every available backend against the reference, over the embedded matrix.

Exit status: 0 when nothing failed, 1 on any FAIL or when no backend could be compared, 2 on a
usage error.
"""
from __future__ import annotations

import gc
import sys
import time
import warnings

from . import env as _env
from .args import parse_list, unknown_name
from .table import render, say

DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "f32": "float32", "fp16": "float16", "float16": "float16",
                 "half": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}


GEMM_OPS = ("moe_experts", "moe_forward", "quant_moe_forward")


def _uses_triton(name: str) -> bool:
    from mojo_opset import registry

    entry = registry.get_entry(name)
    try:
        vers = entry.backend.versions() or {}
    except Exception:
        vers = {}
    return "triton" in vers or name in ("triton", "ttx")


def skip_reason(case, backend: str, device, interpreted: bool) -> str | None:
    import torch

    from .compare_ops import quant_supported

    if case.op == "quant_moe_forward" and not quant_supported():
        return "quantized MoE (mo.quantize_experts / mo.quant_moe_forward) is not in this build"
    if interpreted and case.dtype == torch.bfloat16 and case.op in GEMM_OPS:
        return "bf16 tl.dot is wrong in the Triton interpreter (verify bf16 on a GPU)"
    return None


def run_case(case, backend: str, device, interpreted: bool):
    import mojo_opset as mo

    from .compare_inputs import make_inputs
    from .compare_ops import OPS, REFERENCE, experts_align_for
    from .compare_report import Result
    from .served import summarize

    t0 = time.perf_counter()
    why = skip_reason(case, backend, device, interpreted)
    if why:
        return Result(case, backend, "SKIP", details=[why])
    call, check = OPS[case.op]
    align = experts_align_for(backend) if case.op == "moe_experts" else 1
    if case.op == "moe_experts" and align > 1:
        case.options["align"] = align
    try:
        inp = make_inputs(case, device, align)
        ref = call(inp, REFERENCE)
    except Exception as exc:
        return Result(case, backend, "SKIP", details=[f"the reference rejects this case: {type(exc).__name__}: {exc}"],
                      seconds=time.perf_counter() - t0)
    mo.reset_stats()
    try:
        got = call(inp, backend)
        raised = None
    except Exception as exc:
        raised = exc
    served = summarize(mo.last_served(), case.op)
    res = Result(case, backend, "PASS", served.served_by, served.reasons, served=served)
    if raised is not None:
        res.status = "FAIL"
        res.details = [f"raised {type(raised).__name__}: {raised}"]
    else:
        try:
            diffs, notes, tol = check(got, ref, inp, case)
            res.tolerance = tol.as_dict()
            floats = [d for d in diffs if d.total]
            res.max_abs = max((d.max_abs for d in floats), default=0.0)
            res.max_rel = max((d.max_rel for d in floats), default=0.0)
            res.mismatch = max((d.mismatch for d in diffs), default=0.0)
            bad = [d.describe() for d in diffs if not d.ok]
            res.status = "FAIL" if bad else "PASS"
            res.details = bad + notes
        except Exception as exc:
            res.status = "FAIL"
            res.details = [f"outputs could not be compared: {type(exc).__name__}: {exc}"]
    res.seconds = time.perf_counter() - t0
    return res


def default_dtypes(device) -> list[str]:
    return ["float32", "float16", "bfloat16"] if device.type == "cpu" else ["bfloat16", "float16", "float32"]


def resolve_backends(requested: list[str] | None) -> tuple[list[str], list[str]]:
    """(backends to compare, notes about the unavailable ones); raises UsageError on a bad name."""
    import mojo_opset as mo
    from mojo_opset.registry import REFERENCE

    avail = mo.available_backends()
    notes = unavailable_notes(avail)
    if requested is None:
        return [n for n, rec in avail.items() if rec["available"] and n != REFERENCE], notes
    out = []
    for n in requested:
        if n == REFERENCE:
            raise UsageError(f"--backends: {REFERENCE!r} is the reference every backend is compared with; "
                             "name other backends")
        if n not in avail:
            raise UsageError(unknown_name("--backends", "backend", n, [b for b in avail if b != REFERENCE]))
        if not avail[n]["available"]:
            raise UsageError(f"--backends: backend {n!r} is unavailable: {avail[n]['reason']}")
        out.append(n)
    return out, notes


def unavailable_notes(avail: dict) -> list[str]:
    """One line per distinct reason: ``triton, ttx: unavailable: <reason>``."""
    by_reason: dict[str, list[str]] = {}
    for n, rec in avail.items():
        if not rec["available"]:
            by_reason.setdefault(rec["reason"] or "no reason given", []).append(n)
    return [f"{', '.join(names)}: unavailable: {why}" for why, names in by_reason.items()]


class UsageError(Exception):
    """A usage error (exit status 2)."""


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="accuracy-compare backends against the reference (exit 1 on any FAIL)",
                       description="Run every available backend (or those named) over an embedded matrix of "
                                   "ops, routing options, dtypes, shapes and edge cases, and compare each "
                                   "result with the torch reference.")
    p.add_argument("--backends", help="comma-separated backend ids (default: every available one)")
    p.add_argument("--ops", help="comma-separated ops: gating, permute, experts, combine, forward, quant "
                                 "(or moe_* names; default: all)")
    p.add_argument("--dtypes", help="comma-separated dtypes: fp32, fp16, bf16 (default: all three; the first "
                                    "is the primary one for option variants)")
    p.add_argument("--device", help="torch device (default: cuda, else npu, else cpu)")
    p.add_argument("--quick", action="store_true", help="only the basic case of each op in each dtype")
    p.add_argument("--no-model-shapes", action="store_true", help="skip the model-sized cases on a GPU")
    p.add_argument("--json", metavar="PATH", help="write the JSON report to PATH")
    p.add_argument("--junit", metavar="PATH", help="write a JUnit XML report to PATH")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--failures-only", action="store_true", help="print only failing rows in the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--slowest", type=int, default=0, metavar="N", help="also list the N slowest cases")
    p.set_defaults(func=run)


def _select_cases(args, device):
    from .compare_cases import DTYPES, OP_ALIASES, default_matrix, select

    names = []
    for d in parse_list(args.dtypes) or default_dtypes(device):
        if d.lower() not in DTYPE_ALIASES:
            raise UsageError(unknown_name("--dtypes", "dtype", d, ("fp32", "fp16", "bf16")))
        names.append(DTYPE_ALIASES[d.lower()])
    dtypes = [DTYPES[n] for n in dict.fromkeys(names)]
    ops = None
    if args.ops:
        ops = []
        for o in parse_list(args.ops):
            op = OP_ALIASES.get(o, o)
            if op not in OP_ALIASES.values():
                raise UsageError(unknown_name("--ops", "op", o, OP_ALIASES))
            ops.append(op)
    cases = select(default_matrix("cpu" if args.no_model_shapes else device.type, dtypes), ops)
    if args.quick:
        seen, quick = set(), []
        for c in cases:
            if (c.op, c.dtype) not in seen:
                seen.add((c.op, c.dtype))
                quick.append(c)
        cases = quick
    return cases


def run(args) -> int:
    # before anything imports triton: the Triton-kernel backends need the interpreter on a CPU-only machine
    interp_note = _env.enable_interpreter_if_cpu_only()
    from .compare_report import render_summary, render_table, write_json, write_junit
    from .progress import progress

    try:
        device = _env.pick_device(args.device)
        backends, unavailable = resolve_backends(parse_list(args.backends))
        cases = _select_cases(args, device)
    except (UsageError, ValueError) as exc:
        say(f"mojo-opset compare: {exc}", file=sys.stderr)
        return 2
    if args.list:
        print(render(["op", "dtype", "shape", "options"],
                     [[c.op, c.dtype_name, c.shape_str(), c.options_str().replace(",", ", ")] for c in cases],
                     wrap={3}))
        say(f"{len(cases)} cases per backend; backends: {', '.join(backends) or 'none available'}")
        return 0
    v = _env.versions()
    say(f"mojo-opset compare on {device} ({interp_note}); torch {v['torch']}, triton {v['triton'] or '-'}")
    for n in unavailable:
        say(n, indent=2)
    caveat = _env.interpreter_caveat()
    if caveat:
        say(f"warning: {caveat}")
    if not backends:
        # nothing was verified: a CI job must not pass on an install that lost its backends
        say("no backend other than the torch reference is available: nothing compared", file=sys.stderr)
        if args.json:
            write_json(args.json, _env.environment(device), [])
        if args.junit:
            write_junit(args.junit, [], 0.0)
        return 1
    interpreted = {b: device.type == "cpu" and _env.interpreter_on() and _uses_triton(b) for b in backends}
    total = len(cases) * len(backends)
    bar = progress(total, "compare", enabled=not args.no_progress)
    results = []
    t0 = time.perf_counter()
    for backend in backends:
        for case in cases:
            bar.set_postfix_str(f"{backend} {case.op} {case.dtype_name}")
            with warnings.catch_warnings():
                # numpy's notes on the NaN-token case, from inside the Triton interpreter
                warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
                results.append(run_case(_fresh(case), backend, device, interpreted[backend]))
            bar.update(1)
            if device.type != "cpu" and "model" in case.options:
                gc.collect()
                _empty_cache(device)
    bar.close()
    elapsed = time.perf_counter() - t0
    shown = [r for r in results if r.status == "FAIL"] if args.failures_only else results
    if shown:
        print(render_table(shown))
    print(render_summary(results, elapsed))
    if args.slowest:
        print(f"slowest {args.slowest} cases")
        for r in sorted(results, key=lambda r: -r.seconds)[:args.slowest]:
            say(f"{r.seconds:7.2f}s  {r.name()}", indent=2)
    if args.json:
        env = _env.environment(device)
        env["run"] = {"backends": backends, "interpreted": interpreted, "seconds": round(elapsed, 3)}
        write_json(args.json, env, results)
    if args.junit:
        write_junit(args.junit, results, elapsed)
    return 1 if any(r.status == "FAIL" for r in results) else 0


def _fresh(case):
    """A copy: the runner records per-backend facts (the experts alignment) in the options."""
    from dataclasses import replace

    return replace(case, options=dict(case.options), shape=dict(case.shape))


def _empty_cache(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
