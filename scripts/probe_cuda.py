"""What the diagnostic probes (scripts/*_probe.py) share: NVRTC to build cubins here, the
CUDA driver through ctypes to run them on the GPU machine (which has no compiler and
needs nothing installed)."""
import ctypes
import os
import sys


def nvrtc():
    """NVRTC from NSA_NVRTC_LIB, this machine's usual path or the loader's search."""
    for p in [os.environ.get("NSA_NVRTC_LIB", ""), "/work/nvrtc/nvidia/cu13/lib/libnvrtc.so.13", "libnvrtc.so"]:
        try:
            lib = ctypes.CDLL(p) if p else None
        except OSError:
            lib = None
        if lib:
            return lib
    sys.exit("no NVRTC found (set NSA_NVRTC_LIB)")


def compile_cubin(lib, src, path, arch="sm_90a"):
    """Compiles `src` for `arch` into the cubin file `path`; exits with NVRTC's log on error.
    Returns the cubin's size in bytes."""
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"p.cu", 0, None, None) == 0
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"]
    O = ctypes.c_char_p * len(opts)
    r = lib.nvrtcCompileProgram(prog, len(opts), O(*opts))
    sz = ctypes.c_size_t()
    if r != 0:
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(sz))
        b = ctypes.create_string_buffer(sz.value)
        lib.nvrtcGetProgramLog(prog, b)
        sys.exit(b.value.decode()[:2000])
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(sz))
    b = ctypes.create_string_buffer(sz.value)
    lib.nvrtcGetCUBIN(prog, b)
    with open(path, "wb") as f:
        f.write(b.raw)
    return sz.value


class Driver:
    """The primary context of device 0, modules loaded from cubins, launches and events."""

    def __init__(self):
        self.cu = ctypes.CDLL("libcuda.so.1")
        self.ck(self.cu.cuInit(0), "cuInit")
        dev = ctypes.c_int()
        self.ck(self.cu.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
        self.dev = dev
        ctx = ctypes.c_void_p()
        self.ck(self.cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "retain")
        self.ck(self.cu.cuCtxSetCurrent(ctx), "set current")

    @staticmethod
    def ck(r, what):
        if r != 0:
            sys.exit(f"{what}: CUDA error {r}")

    def attribute(self, attr):
        v = ctypes.c_int()
        self.ck(self.cu.cuDeviceGetAttribute(ctypes.byref(v), attr, self.dev), "attribute")
        return v.value

    def function(self, cubin_path, name):
        data = open(cubin_path, "rb").read()
        mod = ctypes.c_void_p()
        self.ck(self.cu.cuModuleLoadData(ctypes.byref(mod), data), f"load {name}")
        f = ctypes.c_void_p()
        self.ck(self.cu.cuModuleGetFunction(ctypes.byref(f), mod, name.encode()), f"get {name}")
        return f, data

    def alloc(self, nbytes):
        p = ctypes.c_uint64()
        self.ck(self.cu.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(nbytes)), "alloc")  # size_t: buffers over 2 GiB
        return p

    @staticmethod
    def pack(args):
        """The kernel-parameter array of `args` (ctypes values, kept alive by the caller while
        the array is used): built once, it can be launched many times without host work."""
        return (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])

    def launch(self, f, grid, block, args, smem=0, packed=None):
        """`args`: ctypes values (kept alive by the caller for the call); or `packed`, an
        array from `pack`."""
        arr = packed if packed is not None else self.pack(args)
        self.ck(self.cu.cuLaunchKernel(f, grid, 1, 1, block, 1, 1, smem, None, arr, None), "launch")

    def set_smem(self, f, nbytes):
        """Lets `f` take `nbytes` of dynamic shared memory (the opt-in above 48 KB)."""
        self.ck(self.cu.cuFuncSetAttribute(f, 8, nbytes), "max dynamic smem")  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES

    def timed_ms(self, go):
        """Milliseconds the launches `go()` makes take on the default stream (events)."""
        e0, e1 = ctypes.c_void_p(), ctypes.c_void_p()
        self.ck(self.cu.cuEventCreate(ctypes.byref(e0), 0), "event")
        self.ck(self.cu.cuEventCreate(ctypes.byref(e1), 0), "event")
        self.ck(self.cu.cuEventRecord(e0, None), "record")
        go()
        self.ck(self.cu.cuEventRecord(e1, None), "record")
        self.ck(self.cu.cuEventSynchronize(e1), "sync")
        ms = ctypes.c_float()
        self.ck(self.cu.cuEventElapsedTime(ctypes.byref(ms), e0, e1), "elapsed")
        return ms.value

    def sync(self):
        self.ck(self.cu.cuCtxSynchronize(), "sync")
