"""Timing primitives for ``mojo-opset bench``: device timers, CUDA-graph replay, measured peaks.

On CUDA every iteration is bracketed by ``torch.cuda.Event``s and the median is reported; the L2
cache is flushed (a large buffer is overwritten) before each timed iteration, outside the events,
so weights are read from HBM as they are when a model runs its layers one after another.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    ms: float          # median
    ms_min: float
    iters: int


class Timer:
    def __init__(self, device: torch.device, *, warmup: int = 3, min_iters: int = 10, max_iters: int = 200,
                 min_time_s: float = 0.25, flush_l2: bool = True):
        self.device = device
        self.warmup, self.min_iters, self.max_iters, self.min_time_s = warmup, min_iters, max_iters, min_time_s
        self._flush = None
        if device.type == "cuda" and flush_l2:
            l2 = torch.cuda.get_device_properties(device).L2_cache_size or (64 << 20)
            self._flush = torch.empty(max(4 * l2, 256 << 20), dtype=torch.uint8, device=device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> Timing:
        for _ in range(self.warmup):
            fn()
        self.sync()
        return self._cuda(fn) if self.device.type == "cuda" else self._host(fn)

    def _host(self, fn) -> Timing:
        times: list[float] = []
        t_end = time.perf_counter() + self.min_time_s
        while len(times) < self.max_iters and (len(times) < self.min_iters or time.perf_counter() < t_end):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return Timing(statistics.median(times), min(times), len(times))

    def _cuda(self, fn) -> Timing:
        pairs = []
        spent, t_wall = 0.0, time.perf_counter()
        while len(pairs) < self.max_iters and (len(pairs) < self.min_iters or spent < self.min_time_s):
            if self._flush is not None:
                self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
            if len(pairs) % 16 == 0:  # keep the queue short and the wall-clock budget honest
                torch.cuda.synchronize(self.device)
                spent = time.perf_counter() - t_wall
        torch.cuda.synchronize(self.device)
        times = [s.elapsed_time(e) for s, e in pairs]
        return Timing(statistics.median(times), min(times), len(times))


def capture_graph(fn, device: torch.device, warmup: int = 3):
    """Capture ``fn`` into a CUDA graph (warm-up on a side stream first, as torch requires: lazy
    initialisation, autotuning and allocator growth must not happen during capture)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize(device)
    return graph


# --------------------------------------------------------------------------- peaks

def measure_bandwidth(device: torch.device, timer: Timer, nbytes: int) -> float:
    """Device-to-device copy bandwidth in TB/s (read + write bytes)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    b = torch.empty_like(a)
    t = timer(lambda: b.copy_(a))
    del a, b
    return 2 * nbytes / (t.ms * 1e-3) / 1e12


def measure_matmul(device: torch.device, timer: Timer, n: int, dtype=torch.bfloat16) -> float:
    """Dense ``n x n x n`` matmul throughput in TFLOP/s."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = timer(lambda: torch.mm(a, b))
    del a, b
    return 2 * n ** 3 / (t.ms * 1e-3) / 1e12


def measure_peaks(device: torch.device, timer: Timer, quick: bool) -> dict:
    """The roofline's peaks measured here (a copy, a bf16 matmul), and the datasheet's for this GPU."""
    nbytes = (64 << 20) if quick or device.type != "cuda" else (1 << 30)
    n = 256 if quick or device.type != "cuda" else 8192
    measured = {"bandwidth_tbs": measure_bandwidth(device, timer, nbytes),
                "bf16_tflops": measure_matmul(device, timer, n),
                "how": f"device-to-device copy of {nbytes >> 20} MiB; bf16 {n}x{n}x{n} matmul"}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return {"measured": measured, "datasheet": datasheet_for(name) if name else None}


# Datasheet peaks (dense bf16 TFLOP/s without sparsity, HBM TB/s), matched against the device name
# in this order; shown beside the measured peaks.
DATASHEET = [
    ("H100 PCIe", "NVIDIA H100 PCIe", 2.0, 756.0),
    ("H100 NVL", "NVIDIA H100 NVL", 3.9, 835.0),
    ("H100", "NVIDIA H100 SXM", 3.35, 989.0),
    ("H200", "NVIDIA H200", 4.8, 989.0),
    ("H20", "NVIDIA H20", 4.0, 148.0),
    ("B200", "NVIDIA B200", 8.0, 2250.0),
    ("A100-SXM4-80GB", "NVIDIA A100 SXM 80GB", 2.039, 312.0),
    ("A100 80GB PCIe", "NVIDIA A100 PCIe 80GB", 1.935, 312.0),
    ("A100", "NVIDIA A100 40GB", 1.555, 312.0),
]


def datasheet_for(device_name: str) -> dict | None:
    for key, label, tbs, tflops in DATASHEET:
        if key in device_name:
            return {"device": label, "bandwidth_tbs": tbs, "bf16_tflops": tflops}
    return None


def timer_from_args(args, device: torch.device, host: bool = False) -> Timer:
    """bench's timer with the command line's iteration settings; ``host``: wall time on the CPU
    (no L2 flush)."""
    dev = torch.device("cpu") if host else device
    return Timer(dev, warmup=args.warmup, min_iters=args.min_iters, max_iters=args.max_iters,
                 min_time_s=args.min_time, flush_l2=not args.no_flush_l2 and not host)


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
