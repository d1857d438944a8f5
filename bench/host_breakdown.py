"""Host cost of each piece of DecodePlan.run's fast path on a tiny problem (us per call)."""

from __future__ import annotations

import time

import torch

import flashdec
from flashdec import DecodeArgs
from flashdec._streams import torch_current_stream
from flashdec.backends.cuda import _driver

q = torch.randn(1, 8, 64, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 8, 16, 64, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
out = torch.empty_like(q)
p = flashdec.plan(q, k, v, out, backend="cuda")
runner, fast = p._runner, p._fast
launch = runner.fast
args = DecodeArgs(q, k, v, out)
ptrs = fast.pointers(args)
bound = p.bind(q, k, v, out)
stream = torch_current_stream(0)
pieces = {
    "plan.run": lambda: p.run(q, k, v, out),
    "bound plan": bound,
    "pointers": lambda: fast.pointers(args),
    "current stream": lambda: torch_current_stream(0),
    "run_pointers": lambda: runner.run_pointers(ptrs, stream),
    "kernel launch": lambda: launch.issue(stream, launch.params_address),
    "cuLaunchKernel": lambda: _driver.driver.cuLaunchKernel(
        launch.kernel.func.handle, *launch.kernel.grid, 128, 1, 1,
        launch.kernel.func.dynamic_smem, _driver._stream(stream), launch.params_address, 0),
}
for name, fn in pieces.items():
    for _ in range(500):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5000):
        fn()
    torch.cuda.synchronize()
    print(f"{name:>16}: {(time.perf_counter() - t) / 5000 * 1e6:6.2f} us")
