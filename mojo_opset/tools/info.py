"""``mojo-opset info``: platform, versions, devices, backends and the op x backend capability table."""
from __future__ import annotations

import json

from . import env as _env
from .table import render, wrap_lines


def collect() -> dict:
    import mojo_opset as mo
    from mojo_opset import registry

    avail = mo.available_backends()
    entries = registry.backend_entries()
    backends = {}
    for name, rec in avail.items():
        b = entries[name].backend if name in entries else None
        info = {"available": rec["available"], "reason": rec["reason"], "source": rec["source"],
                "description": getattr(b, "description", "") if b is not None else "core reference (the truth)",
                "device_types": list(getattr(b, "device_types", ())) if b is not None else ["any"],
                "default_for": list(getattr(b, "default_for", ())) if b is not None else [],
                "versions": {}, "ops": {}}
        if b is not None:
            try:
                info["versions"] = dict(b.versions() or {})
            except Exception as exc:  # a vendor's probe must not break info
                info["versions"] = {"error": f"{type(exc).__name__}: {exc}"}
        if name == registry.REFERENCE:
            info["ops"] = {op: {"autograd": True, "required_alignment": 1} for op in rec["ops"]}
        elif rec["available"]:
            for op, impl in entries[name].impls().items():
                info["ops"][op] = {"autograd": bool(getattr(impl, "supports_autograd", False)),
                                   "required_alignment": int(getattr(impl, "required_alignment", 1) or 1)}
        backends[name] = info
    caps = {}
    for op in mo.OPS:
        row = {}
        for name, info in backends.items():
            if name == registry.REFERENCE:
                row[name] = "reference"
            elif not info["available"]:
                row[name] = "unavailable"
            else:
                row[name] = "override" if op in info["ops"] else "reference"
        caps[op] = row
    defaults = {}
    for dev in ("cpu", "cuda", "npu"):
        try:
            defaults[dev] = {op: mo.select_backend(op, dev) for op in mo.OPS}
        except Exception as exc:  # e.g. MOJO_BACKEND names an unknown backend
            defaults[dev] = {"error": str(exc)}
    return {"environment": _env.environment(), "backends": backends, "capabilities": caps,
            "selection": defaults}


def _cell(info: dict, op: str, ref: bool) -> str:
    if ref:
        return "ref"
    if not info["available"]:
        return "n/a"
    o = info["ops"].get(op)
    if o is None:
        return "-"
    flags = ["grad"] if o["autograd"] else []
    if o["required_alignment"] > 1:
        flags.append(f"align {o['required_alignment']}")
    return "yes" + (f" ({', '.join(flags)})" if flags else "")


def render_text(data: dict) -> str:
    from mojo_opset.registry import REFERENCE

    e = data["environment"]
    v = e["versions"]
    lines = [f"mojo_opset {v['mojo_opset']}", f"platform   {e['platform']}",
             f"python     {v['python']}",
             f"torch      {v['torch']}" + (f" (CUDA {v['cuda']})" if v.get("cuda") else ""),
             f"triton     {v['triton'] or 'not installed'}"
             + ("  [interpreter on: TRITON_INTERPRET=1]" if e["triton_interpret"] else "")]
    if v.get("torch_npu"):
        lines.append(f"torch_npu  {v['torch_npu']}")
    if e["mojo_env"]:
        lines += wrap_lines("env        " + " ".join(f"{k}={val}" for k, val in e["mojo_env"].items()), hang=11)
    lines += ["", "devices"]
    for d in e["devices"]:
        extra = []
        if "capability" in d:
            extra.append(f"sm {d['capability']}")
        if "memory_gib" in d:
            extra.append(f"{d['memory_gib']} GiB")
        if d["type"] == "cpu":
            extra.append(f"{d['count']} cores")
        idx = f":{d['index']}" if "index" in d else ""
        lines.append(f"  {d['type']}{idx:<3} {d['name']}" + (f"  ({', '.join(extra)})" if extra else ""))
    lines += ["", "backends"]
    rows, notes = [], []
    for name, b in data["backends"].items():
        vers = ", ".join(f"{k} {val}" for k, val in b["versions"].items())
        rows.append([name, "available" if b["available"] else "unavailable", b["source"], vers or "-"])
        notes.append(None if b["available"] else f"why: {b['reason'] or 'no reason given'}")
    lines.append(render(["backend", "status", "source", "versions"], rows, wrap={2, 3}, notes=notes))
    names = list(data["backends"])
    lines += [""] + wrap_lines("capabilities (yes: the backend overrides the op; -: the reference serves it; "
                               "grad: has its own backward; align N: the row alignment its experts kernel asks "
                               "of permute)")
    rows = [[op] + [_cell(data["backends"][n], op, n == REFERENCE) for n in names] for op in data["capabilities"]]
    lines.append(render(["op"] + names, rows, wrap=set(range(1, len(names) + 1))))
    lines += ["", "default selection now (after MOJO_BACKEND* variables)"]
    errors = selection_errors(data)
    for dev, sel in data["selection"].items():
        if "error" not in sel:
            uniq = sorted(set(sel.values()))
            desc = uniq[0] if len(uniq) == 1 else ", ".join(f"{op}={b}" for op, b in sel.items())
            lines += wrap_lines(f"{dev:<5} {desc}", indent=2, hang=6)
    for msg, devs in errors.items():  # one line per distinct error, not one per device
        where = "" if len(devs) == len(data["selection"]) else f" ({', '.join(devs)})"
        lines += wrap_lines(f"error{where}: {msg}", indent=2)
    caveat = _env.interpreter_caveat()
    if caveat:
        lines += [""] + wrap_lines(f"warning: {caveat}")
    if not e["triton_interpret"] and not e["cuda_available"]:
        lines += [""] + wrap_lines("note: no GPU and TRITON_INTERPRET is not set, so Triton-kernel backends are "
                                   "unavailable here; `mojo-opset compare` and `mojo-opset bench` turn the "
                                   "interpreter on by themselves.")
    return "\n".join(lines)


def selection_errors(data: dict) -> dict[str, list[str]]:
    """``{error message: [devices]}`` for the devices whose default selection failed (for example a
    MOJO_BACKEND variable naming an unknown backend)."""
    out: dict[str, list[str]] = {}
    for dev, sel in data["selection"].items():
        if "error" in sel:
            out.setdefault(sel["error"], []).append(dev)
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="platform, versions, devices, backends and their capabilities")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write JSON to PATH (or to stdout when no PATH is given)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Exit status 2 when the selection variables are wrong (the report still prints)."""
    data = collect()
    status = 2 if selection_errors(data) else 0
    if args.json:
        text = json.dumps(data, indent=2, default=str)
        if args.json == "-":
            print(text)
            return status
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(render_text(data))
    return status
