"""Host cost of each piece of DecodePlan.run's fast path and of decode's cached path on a tiny
problem, and of each torch attribute read they make: us per call, GPU kept busy (the bench's
host timing), the pieces taking turns. Run on a GPU machine: PYTHONPATH=src python3
bench/host_breakdown.py"""

from __future__ import annotations

import torch

import flashdec
from flashdec import DecodeArgs, _plan_cache
from flashdec._streams import torch_current_stream
from flashdec.backends.cuda import _driver
from flashdec.bench.host import busy_gpu_times

q = torch.randn(1, 8, 64, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 8, 16, 64, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
out = torch.empty_like(q)
p = flashdec.plan(q, k, v, out, backend="cuda")
p.run(q, k, v, out)  # the parameter struct the bare launch passes now holds these pointers
runner, fast = p._runner, p._fast
launch = runner.fast
given = DecodeArgs(q, k, v, out, None, None, None, None)
ptrs = fast.pointers(given)
stream = torch_current_stream(0)
bound = p.bind(q, k, v, out)
kernel = launch.kernel
bare = (kernel.func.handle, *kernel.grid, kernel.block, 1, 1, kernel.func.dynamic_smem,
        _driver.driver.CUstream(stream), launch.params_address, 0)
key_args = (given, None, (None, None, None, False), "cuda", {})
pieces = {
    "cuLaunchKernel (bare)": lambda: _driver.driver.cuLaunchKernel(*bare),
    "cuGraphLaunch (bound)": bound,
    "plan.run": lambda: p.run(q, k, v, out),
    "decode(out=)": lambda: flashdec.decode(q, k, v, out, backend="cuda"),
    "fast.pointers (layouts checked)": lambda: fast.pointers(given),
    "fast.pointers (layouts known)": lambda: fast.pointers(given, layouts_known=True),
    "decode's cache key": lambda: _plan_cache.key(*key_args),
    "run_pointers (launch incl.)": lambda: runner.run_pointers(ptrs, stream),
    "Launch.issue (launch incl.)": lambda: launch.issue(stream, launch.params_address),
    "current stream": lambda: torch_current_stream(0),
    "DecodeArgs bundle": lambda: DecodeArgs(q, k, v, out, None, None, None, None),
    "an empty call (the loop's own cost)": lambda: None,
}
for attr in ("shape", "dtype", "requires_grad"):
    pieces[f"k.{attr}"] = (lambda a: lambda: getattr(k, a))(attr)
for method in ("stride", "get_device", "is_contiguous", "is_neg", "data_ptr"):
    pieces[f"k.{method}()"] = (lambda m: lambda: getattr(k, m)())(method)
for fn in pieces.values():
    for _ in range(50):
        fn()
torch.cuda.synchronize()
times, busy = busy_gpu_times(pieces, 4000)
for name, us in times.items():
    print(f"{name:>34}: {us:6.2f} us")
print("GPU kept busy throughout:", busy)
