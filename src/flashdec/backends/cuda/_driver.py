"""The CUDA driver calls the backend needs, through ``cuda.bindings.driver``.

Kernels launch with ``cuLaunchKernel`` and one by-value parameter struct whose address is
packed once per plan: cuda.core's generic ``launch`` costs ~4.5 us of host time per call,
too much for a kernel that runs in ~6 us. Modules are loaded per device in that device's
primary context (the one torch, CuPy and JAX use).
"""

from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass
from typing import Any

from ..._errors import BackendUnavailableError, CudaError

__all__ = ["driver", "check", "init", "DeviceInfo", "device_info", "Function", "load_function",
           "launch", "LaunchEx", "Graph", "DeviceAllocation", "memset32_async", "copy_to_device_async",
           "ContextGuard", "params_pointer_array"]

try:
    from cuda.bindings import driver
except ImportError as exc:  # the cuda extra is not installed
    driver = None
    _IMPORT_ERROR: Exception | None = exc
else:
    _IMPORT_ERROR = None


def _name(result: Any) -> str:
    err, name = driver.cuGetErrorName(result)
    return name.decode() if err == driver.CUresult.CUDA_SUCCESS and name else str(result)


def check(result: Any, what: str) -> None:
    """Raise CudaError naming the call and the CUresult unless ``result`` is success."""
    if result != driver.CUresult.CUDA_SUCCESS:
        name = _name(result)
        raise CudaError(f"{what} failed: {name}", name)


_init_lock = threading.Lock()
_init_state: list[Any] = []  # [None] once initialised, [exception] on failure


def init() -> None:
    """cuInit once per process; BackendUnavailableError says why the driver cannot start."""
    with _init_lock:
        if not _init_state:
            try:
                if driver is None:
                    raise BackendUnavailableError(
                        f"cuda-python is not installed ({_IMPORT_ERROR}); pip install "
                        f"'flashdec[cuda]'")
                try:
                    (result,) = driver.cuInit(0)
                except Exception as exc:  # no libcuda.so: no driver on this machine
                    raise BackendUnavailableError(f"no CUDA driver could be loaded ({exc})") from exc
                if result != driver.CUresult.CUDA_SUCCESS:
                    raise BackendUnavailableError(f"cuInit failed with {_name(result)} (no GPU "
                                                  f"or no usable driver)")
                err, count = driver.cuDeviceGetCount()
                check(err, "cuDeviceGetCount")
                if count == 0:
                    raise BackendUnavailableError("the CUDA driver sees no GPU")
                _init_state.append(None)
            except Exception as exc:
                _init_state.append(exc)
        if _init_state[0] is not None:
            raise _init_state[0]


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    arch: str            # "sm_90"
    num_sms: int
    context: Any         # the primary context
    dram_bytes_per_s: float | None = None  # peak, from the memory clock and bus width


_devices: dict[int, DeviceInfo] = {}
_devices_lock = threading.Lock()


def device_info(index: int) -> DeviceInfo:
    """Properties and primary context of device ``index`` (retained once, kept)."""
    found = _devices.get(index)
    if found is not None:
        return found
    init()
    with _devices_lock:
        if index not in _devices:
            err, dev = driver.cuDeviceGet(index)
            check(err, f"cuDeviceGet({index})")
            attr = driver.CUdevice_attribute
            values = []
            for a in (attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                      attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                      attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT):
                err, value = driver.cuDeviceGetAttribute(a, dev)
                check(err, "cuDeviceGetAttribute")
                values.append(value)
            err, raw_name = driver.cuDeviceGetName(256, dev)
            check(err, "cuDeviceGetName")
            err, ctx = driver.cuDevicePrimaryCtxRetain(dev)
            check(err, f"cuDevicePrimaryCtxRetain({index})")
            _devices[index] = DeviceInfo(index, raw_name.split(b"\0")[0].decode(),
                                         f"sm_{values[0]}{values[1]}", values[2], ctx,
                                         _dram_bytes_per_s(dev))
        return _devices[index]


def _dram_bytes_per_s(dev: Any) -> float | None:
    """Peak DRAM bandwidth: memory clock (kHz) x 2 (double data rate) x bus width (bits) / 8;
    None where the driver does not say."""
    attr = driver.CUdevice_attribute
    err, khz = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE, dev)
    err2, bits = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH, dev)
    if err != driver.CUresult.CUDA_SUCCESS or err2 != driver.CUresult.CUDA_SUCCESS or not khz * bits:
        return None
    return khz * 1e3 * 2 * bits / 8


class ContextGuard:
    """Make a device's primary context current for a block, restoring the caller's after."""

    __slots__ = ("ctx", "pushed")

    def __init__(self, device: DeviceInfo) -> None:
        self.ctx = device.context
        self.pushed = False

    def __enter__(self) -> "ContextGuard":
        err, current = driver.cuCtxGetCurrent()
        check(err, "cuCtxGetCurrent")
        if int(current) != int(self.ctx):
            check(driver.cuCtxPushCurrent(self.ctx)[0], "cuCtxPushCurrent")
            self.pushed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pushed:
            check(driver.cuCtxPopCurrent()[0], "cuCtxPopCurrent")


@dataclass(frozen=True)
class Function:
    handle: Any          # CUfunction in the device's primary context
    name: str            # the name expression, for error messages
    module: Any          # keeps the CUmodule referenced
    dynamic_smem: int = 0  # bytes of dynamic shared memory every launch passes


def load_function(device: DeviceInfo, cubin: bytes, lowered_name: str, name: str,
                  dynamic_smem: int = 0) -> Function:
    """Load ``cubin`` and get one kernel, allowed ``dynamic_smem`` bytes of dynamic shared
    memory (above 48 KB the driver needs the opt-in attribute)."""
    with ContextGuard(device):
        err, module = driver.cuModuleLoadData(cubin)
        check(err, f"cuModuleLoadData({name}) on device {device.index}")
        err, func = driver.cuModuleGetFunction(module, lowered_name.encode())
        check(err, f"cuModuleGetFunction({name})")
        if dynamic_smem:
            attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            check(driver.cuFuncSetAttribute(func, attr, dynamic_smem)[0],
                  f"cuFuncSetAttribute({name}, {dynamic_smem} bytes of shared memory)")
    return Function(func, name, module, dynamic_smem)


_streams: dict[int, Any] = {}  # CUstream wrappers by handle: building one costs ~0.5 us


def _stream(stream: int) -> Any:
    handle = _streams.get(stream)
    if handle is None:
        if len(_streams) > 256:
            _streams.clear()
        handle = _streams[stream] = driver.CUstream(stream)
    return handle


def launch(device: DeviceInfo, func: Function, grid: tuple[int, int, int], block: int,
           stream: int, params_address: int) -> None:
    """Launch ``func`` with one by-value struct argument whose address array is at
    ``params_address`` (a ``void*[1]``), on ``stream`` of ``device``."""
    handle = _stream(stream)
    # Optimistic: the device's primary context is almost always current (torch, CuPy and
    # JAX use it); only when the launch fails is it pushed and the launch retried, so a
    # plan's run skips the cuCtxGetCurrent round trip.
    args = (func.handle, grid[0], grid[1], grid[2], block, 1, 1, func.dynamic_smem, handle,
            params_address, 0)
    (result,) = driver.cuLaunchKernel(*args)
    if result != driver.CUresult.CUDA_SUCCESS:
        _retry_in_context(device, lambda: driver.cuLaunchKernel(*args),
                          f"cuLaunchKernel({func.name}) grid {grid}")


def _retry_in_context(device: DeviceInfo, call: Any, what: str) -> None:
    """A launch failed: retry it with the device's primary context pushed (another context
    was current), and raise CudaError naming ``what`` if it fails again."""
    with ContextGuard(device):
        (result,) = call()
    if result != driver.CUresult.CUDA_SUCCESS:
        name = _name(result)
        raise CudaError(f"{what} on device {device.index} failed: {name}", name)


class LaunchEx:
    """A kernel with its grid, launched by ``run(stream, params_address)``: through
    ``cuLaunchKernelEx`` when it has launch attributes (its configuration built once, a call
    sets the stream), else a plain :func:`launch` with no wrapper frame on the per-call path.

    ``dependent``: programmatic stream serialization (Hopper and newer; a plain launch
    before), so its CTAs may start while the previous kernel of the stream finishes, and
    wait for that kernel's memory in ``griddepcontrol.wait``."""

    def __init__(self, device: DeviceInfo, func: Function, grid: tuple[int, int, int],
                 block: int, *, dependent: bool = False) -> None:
        self.device, self.func, self.grid, self.block = device, func, grid, block
        if not (dependent and int(device.arch.removeprefix("sm_")) >= 90):
            self.run = functools.partial(launch, device, func, grid, block)
            return
        attr = driver.CUlaunchAttribute()
        attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        config = self.config = driver.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid
        config.blockDimX, config.blockDimY, config.blockDimZ = block, 1, 1
        config.sharedMemBytes = func.dynamic_smem
        config.attrs = [attr]
        config.numAttrs = 1
        self.run = self._run_extended

    def _run_extended(self, stream: int, params_address: int) -> None:
        self.config.hStream = _stream(stream)
        (result,) = driver.cuLaunchKernelEx(self.config, self.func.handle, params_address, 0)
        if result != driver.CUresult.CUDA_SUCCESS:
            _retry_in_context(
                self.device,
                lambda: driver.cuLaunchKernelEx(self.config, self.func.handle, params_address, 0),
                f"cuLaunchKernelEx({self.func.name}) grid {self.grid}")


class Graph:
    """Launches recorded once into a CUDA graph, replayed with one ``cuGraphLaunch`` (about
    half a kernel launch's host cost, whatever the number of kernels).

    ``record(stream)`` issues the launches on a private stream under capture (this thread's
    only); their parameters are copied into the graph, so what they point to is fixed."""

    def __init__(self, device: DeviceInfo, record: Any) -> None:
        self.device = device
        self.graph = self.exec = None
        with ContextGuard(device):
            err, stream = driver.cuStreamCreate(driver.CUstream_flags.CU_STREAM_NON_BLOCKING)
            check(err, "cuStreamCreate")
            try:
                mode = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
                check(driver.cuStreamBeginCapture(stream, mode)[0], "cuStreamBeginCapture")
                try:
                    record(int(stream))
                finally:
                    err, graph = driver.cuStreamEndCapture(stream)
                check(err, "cuStreamEndCapture")
                self.graph = graph
                err, self.exec = driver.cuGraphInstantiate(graph, 0)
                check(err, "cuGraphInstantiate")
            finally:
                driver.cuStreamDestroy(stream)

    def replay_on(self, stream: int) -> Any:
        """A call that replays the graph on ``stream`` (a handle; 0 is the legacy default
        stream), its arguments built once."""
        handle, graph_exec, graph_launch = driver.CUstream(stream), self.exec, driver.cuGraphLaunch

        def replay() -> None:
            (result,) = graph_launch(graph_exec, handle)
            if result:  # CUDA_SUCCESS is 0
                _retry_in_context(self.device, lambda: graph_launch(graph_exec, handle),
                                  "cuGraphLaunch")

        return replay

    def __del__(self) -> None:
        if driver is None:
            return
        try:
            with ContextGuard(self.device):
                if self.exec is not None:
                    driver.cuGraphExecDestroy(self.exec)
                if self.graph is not None:
                    driver.cuGraphDestroy(self.graph)
        except Exception:  # interpreter shutdown: the driver may be gone already
            pass
        self.exec = self.graph = None


class DeviceAllocation:
    """Device memory from cuMemAlloc in the device's primary context, freed on collection."""

    def __init__(self, device: DeviceInfo, nbytes: int) -> None:
        self.device = device
        self.nbytes = nbytes
        self.ptr = 0
        if nbytes:
            with ContextGuard(device):
                err, ptr = driver.cuMemAlloc(nbytes)
                check(err, f"cuMemAlloc({nbytes}) on device {device.index}")
            self.ptr = int(ptr)

    def __del__(self) -> None:
        if self.ptr and driver is not None:
            try:
                with ContextGuard(self.device):
                    driver.cuMemFree(self.ptr)
            except Exception:  # interpreter shutdown: the driver may be gone already
                pass
            self.ptr = 0


def memset32_async(device: DeviceInfo, ptr: int, value: int, count: int, stream: int) -> None:
    if count:
        with ContextGuard(device):
            check(driver.cuMemsetD32Async(ptr, value, count, driver.CUstream(stream))[0],
                  "cuMemsetD32Async")


def copy_to_device_async(device: DeviceInfo, dst: int, src_address: int, nbytes: int,
                         stream: int) -> None:
    """Host memory at ``src_address`` -> device ``dst``, ordered on ``stream``."""
    if nbytes:
        with ContextGuard(device):
            check(driver.cuMemcpyHtoDAsync(dst, src_address, nbytes, driver.CUstream(stream))[0],
                  "cuMemcpyHtoDAsync")


def params_pointer_array(struct: ctypes.Structure) -> ctypes.Array:
    """A ``void*[1]`` holding the struct's address: cuLaunchKernel's kernelParams."""
    return (ctypes.c_void_p * 1)(ctypes.addressof(struct))
