"""Host overhead: microseconds of host time per call of flashdec's entry points, of the bare
``cuLaunchKernel`` they wrap and of SDPA, on a tiny problem, with the GPU kept busy so only
the host's work is timed (:func:`host_overhead`), and its one-line text.

Each round queues a GPU sleep long enough to cover a batch of calls, times the batch, then
synchronizes; the entries take turns round by round (a shared host drifts), and each reports
the median over its rounds. Ratios are to the bare launch measured in the same run: hosts
differ, ratios travel.
"""

from __future__ import annotations

import statistics
import time

from .peers import na_reason
from .rows import SHORT_NAMES

HOST_CALLS = 10_000                        # calls per entry, in rounds of HOST_BATCH
HOST_BATCH = 200
HOST_PROBLEM = (1, 8, 8, 16, 64)           # B, H_q, H_kv, K_len, D: GPU time negligible
FLOOR = "cuLaunchKernel"                   # the entry the ratios divide by
BUSY_US_PER_CALL = 60                      # GPU sleep queued per call of a batch


def _entries(torch, flashdec) -> dict:
    """name -> a maker returning the zero-argument call to time (made once, warm)."""
    import torch.nn.functional as F

    b, hq, hkv, klen, d = HOST_PROBLEM
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(b, hkv, klen, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    q4 = q.unsqueeze(2)
    plan = flashdec.plan(q, k, v, out, backend="cuda")
    plan.run(q, k, v, out)  # the parameter struct now holds these pointers

    def bare_launch():
        """The plan's own kernel through cuda.bindings' cuLaunchKernel, every argument
        prepared: what any Python caller of this kernel pays at least."""
        from flashdec.backends.cuda import _driver

        launch = plan._runner.fast
        kernel = launch.kernel
        args = (kernel.func.handle, *kernel.grid, kernel.block, 1, 1, kernel.func.dynamic_smem,
                _driver.driver.CUstream(torch.cuda.current_stream().cuda_stream),
                launch.params_address, 0)
        call = _driver.driver.cuLaunchKernel
        return lambda: call(*args)

    def bound():
        return plan.bind(q, k, v, out)

    return {
        FLOOR: bare_launch,
        "plan.run": lambda: lambda: plan.run(q, k, v, out),
        "decode": lambda: lambda: flashdec.decode(q, k, v, out, backend="cuda"),
        "bound": bound,
        "sdpa": lambda: lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True),
    }


def busy_gpu_times(fns: dict, calls: int = HOST_CALLS) -> tuple[dict, bool]:
    """Median host us per call of each zero-argument call in ``fns`` (warm already), timed in
    rounds of HOST_BATCH calls behind a GPU sleep that outlasts the batch, the calls taking
    turns round by round; and whether the GPU stayed busy through every batch."""
    import torch

    batch = max(1, min(HOST_BATCH, calls))
    khz = getattr(torch.cuda.get_device_properties(0), "clock_rate", 0) or 2_000_000
    cycles = int(batch * BUSY_US_PER_CALL * khz / 1e3)
    samples = {name: [] for name in fns}
    stream = torch.cuda.current_stream()
    names, busy = list(fns), True
    for r in range(max(1, calls // batch)):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            torch.cuda._sleep(cycles)  # the GPU stays busy while the host queues the batch
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            elapsed = time.perf_counter() - t0
            busy &= not stream.query()  # still sleeping: only host time was counted
            torch.cuda.synchronize()
            samples[name].append(elapsed / batch * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}, busy


def host_overhead(calls: int = HOST_CALLS) -> dict:
    """Host us per call of the bare ``cuLaunchKernel`` of the plan's kernel, ``plan.run``,
    ``flashdec.decode`` (cuda backend, ``out=`` given), a bound plan's call (CUDA graph
    replay) and default-dispatch SDPA, ``calls`` calls each, with the GPU kept busy; and
    each one's ratio to the bare launch. A failure is an ``na`` entry."""
    import torch

    import flashdec

    result = {"problem": dict(zip(("batch", "heads", "kv_heads", "kv_len", "head_dim"),
                                  HOST_PROBLEM), dtype="bfloat16"),
              "calls": calls, "us_per_call": {}, "ratio": {}, "na": {}}
    fns = {}
    for name, make in _entries(torch, flashdec).items():
        try:
            fn = make()
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            fns[name] = fn
        except Exception as exc:
            result["na"][name] = na_reason(exc)
    times, result["gpu_busy"] = busy_gpu_times(fns, calls)
    result["us_per_call"].update(times)
    floor = result["us_per_call"].get(FLOOR)
    if floor:
        result["ratio"] = {name: us / floor for name, us in result["us_per_call"].items()}
    return result


def host_overhead_text(host: dict | None) -> str:
    """One line of :func:`host_overhead`'s result (``not measured`` for None)."""
    if not host:
        return "not measured"
    ratio = host.get("ratio") or {}
    parts = [f"{k} {v:.2f} us/call" + (f" ({ratio[k]:.2f}x)" if k in ratio and k != FLOOR else "")
             for k, v in host["us_per_call"].items()]
    parts += [f"{k} n/a ({v})" for k, v in host["na"].items()]
    p = host["problem"]
    busy = "" if host.get("gpu_busy", True) else "; GPU went idle during a batch: host time overstated"
    return (", ".join(parts) + f"  [{host['calls']} calls, median of rounds, GPU kept busy, "
            f"x = ratio to {FLOOR}; B={p['batch']} H_q={p['heads']} H_kv={p['kv_heads']} "
            f"K={p['kv_len']} D={p['head_dim']} {SHORT_NAMES.get(p['dtype'], p['dtype'])}{busy}]")
