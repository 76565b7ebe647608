"""Run the long fuzz profile as parallel shards and sum what ran.

Each (backend, shard) is its own pytest process with its own hypothesis seed, so the shards draw
different cases and compile kernels on different CPU cores; a shared time limit stops them all, and the
per-case logs (``tests/fuzz/record.py``) say exactly how many cases ran and passed even for a shard that
was stopped.  Example, on the GPU machine::

    python tests/fuzz/long_run.py --backends triton,ttx --properties forward --cases 10000 \\
        --shards 7 --time-limit 540 --out fuzz-out

prints one row per backend and property and writes ``fuzz-out/summary.json``; exits 1 if any case
failed.  Failures are listed with their case (seed included) to become regression tests.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TESTS = {"forward": "test_forward_matches_reference", "composed": "test_composed_ops_match_reference",
         "gradients": "test_gradients_match_reference",
         "quant": "test_quant_forward_matches_reference", "invalid_ids": "test_invalid_forced_ids_rejected",
         "modules": "test_modules_match_functional", "module_invalid_ids": "test_module_invalid_ids_rejected",
         "replay": "test_replay_microbatches_match_no_checkpoint"}
FILES = ("test_fuzz_backends.py", "test_fuzz_modules.py")
HERE = Path(__file__).resolve().parent


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", help="comma-separated backends, e.g. triton,ttx (default: every available "
                                      "kernel backend)")
    p.add_argument("--properties", default="forward", help=f"comma-separated, of {', '.join(TESTS)}")
    p.add_argument("--cases", type=int, default=10000, help="cases per backend and property, over all shards")
    p.add_argument("--shards", type=int, default=4, help="processes per backend")
    p.add_argument("--time-limit", type=float, default=3600, help="seconds before every shard is stopped")
    p.add_argument("--seed", type=int, default=0, help="shard i uses hypothesis seed SEED + i")
    p.add_argument("--shrink", action="store_true", help="shrink failures (slow); off by default")
    p.add_argument("--out", default="fuzz-out", help="folder for logs and summary.json")
    p.add_argument("--summarize", nargs="+", metavar="DIR", help="only sum the logs of earlier runs' folders")
    a = p.parse_args(argv)
    if a.summarize:
        return a
    if a.backends:
        a.backends = [b for b in a.backends.split(",") if b]
    else:
        import mojo_opset as mo
        a.backends = [n for n, info in mo.available_backends().items() if info["available"] and n != "torch"]
        if not a.backends:
            p.error("no kernel backend is available here (see `mojo-opset info`); name one with --backends")
    a.properties = [x for x in a.properties.split(",") if x]
    bad = [x for x in a.properties if x not in TESTS]
    if bad:
        p.error(f"--properties must be among {', '.join(TESTS)}, got {', '.join(bad)}")
    if a.shards < 1 or a.cases < 1:
        p.error("--shards and --cases must be at least 1")
    return a


def _launch(a, out: Path) -> list[dict]:
    per_shard = math.ceil(a.cases / a.shards)
    select = " or ".join(TESTS[x] for x in a.properties)
    shards = []
    for backend in a.backends:
        for i in range(a.shards):
            name = f"{backend}-{i}"
            env = dict(os.environ, MOJO_FUZZ_PROFILE="long", MOJO_FUZZ_BACKENDS=backend,
                       MOJO_FUZZ_EXAMPLES=str(per_shard), MOJO_FUZZ_SHRINK="1" if a.shrink else "0",
                       MOJO_FUZZ_LOG=str(out / f"{name}.jsonl"), MOJO_FUZZ_STOP=str(out / "STOP"),
                       PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                       HYPOTHESIS_STORAGE_DIRECTORY=str(out / f"hypothesis-{name}"))
            cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                   f"--hypothesis-seed={a.seed + i}", *(str(HERE / f) for f in FILES), "-k", select]
            log = open(out / f"{name}.out", "w")
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=HERE.parent.parent, start_new_session=True)
            shards.append(dict(name=name, proc=proc, log=log))
    return shards


def _wait(shards: list[dict], limit: float, out: Path) -> None:
    deadline = time.monotonic() + limit
    while any(s["proc"].poll() is None for s in shards) and time.monotonic() < deadline:
        time.sleep(2)
    (out / "STOP").touch()      # errors from here on are the interruption's (tests/fuzz/record.py)
    for s in shards:
        s["stopped"] = s["proc"].poll() is None
        if s["stopped"]:
            os.killpg(s["proc"].pid, signal.SIGINT)
    grace = time.monotonic() + 20
    for s in shards:
        try:
            s["proc"].wait(timeout=max(0.1, grace - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(s["proc"].pid, signal.SIGKILL)
            s["proc"].wait()
        s["log"].close()


def summarize(outs: list[Path], shards: list[dict] | None = None) -> dict:
    """Totals per backend and property from the per-case logs in the folders ``outs``."""
    rows = collections.defaultdict(lambda: dict(cases=0, passed=0, failed=0, seconds=0.0, max_T=0, max_E=0,
                                                dtypes=collections.Counter(), x_layouts=collections.Counter(),
                                                w_layouts=collections.Counter(), T0=0, grouped=0, nan_inf=0,
                                                schemes=collections.Counter(), failures=[]))
    for path in sorted(p for out in outs for p in out.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:      # a line cut by a stopped shard
                continue
            r = rows[(d["backend"], d["property"])]
            r["cases"] += 1
            r["passed" if d["ok"] else "failed"] += 1
            r["seconds"] += d["seconds"]
            r["max_T"], r["max_E"] = max(r["max_T"], d["T"]), max(r["max_E"], d["E"])
            r["T0"] += d["T"] == 0
            r["grouped"] += d["grouped"]
            r["nan_inf"] += d["nan"] or d["inf"] or d.get("special_bias", False)
            r["dtypes"][d["dtype"]] += 1
            r["x_layouts"][d["x_layout"]] += 1
            r["w_layouts"][d["w_layout"]] += 1
            if "scheme" in d:
                r["schemes"][d["scheme"]] += 1
            if not d["ok"] and len(r["failures"]) < 10:
                r["failures"].append(dict(case=d["case"], error=d["error"], shard=path.stem))
    result = {"groups": [dict(backend=b, property=p, **{k: (dict(v) if isinstance(v, collections.Counter) else v)
                                                        for k, v in r.items()})
                         for (b, p), r in sorted(rows.items())]}
    if shards is not None:
        result["shards"] = [dict(name=s["name"], returncode=s["proc"].returncode, stopped_by_limit=s["stopped"])
                            for s in shards]
    return result


def report(result: dict) -> str:
    lines = ["| backend | property | cases | passed | failed | max T | max E | T=0 | grouped | NaN/Inf | dtypes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in result["groups"]:
        dts = ", ".join(f"{k} {v}" for k, v in sorted(g["dtypes"].items()))
        lines.append(f"| {g['backend']} | {g['property']} | {g['cases']} | {g['passed']} | {g['failed']} | "
                     f"{g['max_T']} | {g['max_E']} | {g['T0']} | {g['grouped']} | {g['nan_inf']} | {dts} |")
    for g in result["groups"]:
        for f in g["failures"]:
            lines.append(f"FAIL {g['backend']} {g['property']} [{f['shard']}] {f['case']}\n    {f['error']}")
    for s in result.get("shards", []):
        if s["returncode"] not in (0, None) and not s["stopped_by_limit"]:
            lines.append(f"shard {s['name']} exited with {s['returncode']} (see its .out log)")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = _args(argv)
    if a.summarize:
        result = summarize([Path(d) for d in a.summarize])
        print(report(result))
        return 1 if any(g["failed"] for g in result["groups"]) else 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "STOP").unlink(missing_ok=True)
    t0 = time.monotonic()
    shards = _launch(a, out)
    _wait(shards, a.time_limit, out)
    result = summarize([out], shards)
    result["wall_seconds"] = round(time.monotonic() - t0, 1)
    result["settings"] = dict(backends=a.backends, properties=a.properties, cases=a.cases, shards=a.shards,
                              seed=a.seed, time_limit=a.time_limit)
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    print(report(result))
    print(f"wall {result['wall_seconds']} s")
    failed = any(g["failed"] for g in result["groups"])
    crashed = any(s["returncode"] not in (0, None) and not s["stopped_by_limit"] for s in result["shards"])
    return 1 if failed or crashed else 0


if __name__ == "__main__":
    sys.exit(main())
