"""Per-case log of a fuzz run: with ``MOJO_FUZZ_LOG=path`` every case a property executes appends one
JSON line (property, backend, outcome, seconds, the case), so a long run stopped by a time limit still
says exactly how many cases ran and passed (``tests/fuzz/long_run.py`` sums the logs)."""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

LOG = os.environ.get("MOJO_FUZZ_LOG")
# a runner stopping its shards creates this file first: an error raised after it (a compiler child
# killed by the interrupt, say) belongs to the interruption, not to the case
STOP = os.environ.get("MOJO_FUZZ_STOP")


def _fields(case) -> dict:
    inner = getattr(case, "case", case)            # a QuantCase or a ReplayCase wraps a Case
    out = dict(T=inner.T, E=inner.E, K=inner.K, H=inner.H, I=inner.I, dtype=str(inner.dtype)[6:],
               grouped=inner.routing["num_expert_groups"] > 1, score_func=inner.routing["score_func"],
               x_layout=inner.x_layout, w_layout=inner.w_layout, nan=bool(inner.nan_rows),
               inf=bool(inner.inf_rows), shared=inner.shared, special_bias=bool(inner.special_bias))
    if hasattr(case, "scheme"):
        out["scheme"] = case.scheme
    if hasattr(case, "modes"):
        out.update(microbatches=len(case.modes), ckpt=case.ckpt, outer=case.outer, offload=case.offload)
    return out


@contextmanager
def recorded(prop: str, backend: str, case, **extra):
    """Log the case's outcome (passed, or the error that failed it) when MOJO_FUZZ_LOG is set."""
    if not LOG:
        yield
        return
    t0 = time.perf_counter()
    error = None
    try:
        yield
    except Exception as e:
        stopping = STOP is not None and os.path.exists(STOP)
        error = "interrupted" if stopping else f"{type(e).__name__}: {e}"[:2000]
        raise
    except BaseException:       # interrupted (time limit, Ctrl-C): the case did not finish, log nothing
        error = "interrupted"
        raise
    finally:
        if error != "interrupted":
            _write(dict(property=prop, backend=backend, ok=error is None,
                        seconds=round(time.perf_counter() - t0, 4), case=case.short(), error=error,
                        **_fields(case), **extra))


def _write(line: dict) -> None:
    with open(LOG, "a") as f:
        f.write(json.dumps(line) + "\n")
