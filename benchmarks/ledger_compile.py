"""What the GPU compiler makes of a Triton launch, without a GPU: registers, spills, shared memory and
whether its loads are software-pipelined.

The interpreter runs a kernel's Python, not its machine code, so it cannot see what ptxas does with a
tile: how many registers a thread needs, whether some spill to local memory (Liger's rms_norm backward at
H = 32768 and its layer_norm backward at N = 16384 do, and run 6–10× slower than their bytes say), how
much shared memory a program takes. Triton compiles for a named architecture without a device:
``triton.compile`` (with a ``GPUTarget``) runs the whole pipeline down to a cubin with Triton's bundled
ptxas, and ``cuobjdump --dump-resource-usage`` reads the cubin's resource table.

* ``compile_request(fn, args, kwargs)``: a JSON description of one launch (the kernel's module and name,
  each argument as the JIT specialises it: tensor dtypes and 16-byte alignment, integers with their
  value, constexprs, ``num_warps`` / ``num_stages``), recorded by ``ledger_count.KernelCounter``.
* ``resource_usage(requests, arch)``: compiles each distinct request for compute capability ``arch`` (90:
  Hopper, 80: Ampere) in a subprocess without ``TRITON_INTERPRET`` (the interpreter replaces
  ``triton.jit``), and returns per request ``{"registers", "spill_bytes", "shared_bytes", "num_warps",
  "num_stages", "pipelined_loads"}`` or ``{"error"}``. ``spill_bytes``: spill stores + spill loads per thread in the code (static, from ptxas);
  ``pipelined_loads``: loads the software pipeliner made asynchronous (issued ``num_stages`` − 1 iterations
  ahead of their use).

Run as ``python benchmarks/ledger_compile.py < requests.json`` it prints the usage as JSON (that is what
``resource_usage`` does). The compiler is this environment's Triton and ptxas, not the one a published
measurement used: register allocation can differ between versions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

# What a launch record takes from a compiled kernel (see _compile_one)
USAGE_FIELDS = ("registers", "spill_bytes", "shared_bytes", "num_stages", "pipelined_loads")
# TritonGPU IR ops of a software-pipelined load (cp.async into shared memory; TMA on Hopper)
PIPELINED_LOAD_OPS = ("ttg.async_copy_global_to_local", "ttng.async_tma_copy_global_to_local")


# ----------------------------------------------------------------------------- in the counting process
def _arg_spec(value):
    """One argument as the JIT's specialisation sees it (a JSON value)."""
    import torch

    base = getattr(value, "base", None)
    if isinstance(base, torch.Tensor) and hasattr(value, "dtype"):  # the interpreter's TensorWrapper
        return {"tensor": str(value.dtype), "triton_dtype": True,
                "aligned": (base.storage_offset() * base.element_size()) % 16 == 0}
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).replace("torch.", ""),
                "aligned": (value.storage_offset() * value.element_size()) % 16 == 0}
    if isinstance(value, bool) or value is None or isinstance(value, (int, float, str)):
        return {"value": value}
    dtype_name = getattr(value, "name", None)  # a tl.dtype constexpr (tl.bfloat16)
    if dtype_name is not None and type(value).__name__ in ("dtype", "pointer_type"):
        return {"tl_dtype": str(value)}
    value = getattr(value, "value", value)  # tl.constexpr
    if isinstance(value, (bool, int, float, str)) or value is None:
        return {"value": value}
    raise TypeError(f"argument {value!r} of type {type(value).__name__} has no compile description")


def compile_request(fn, args, kwargs) -> dict | None:
    """The description of one launch of the kernel whose Python function is ``fn``; None when an argument
    cannot be described (the launch is then priced without compiler data)."""
    try:
        return {"module": fn.__module__, "name": fn.__name__, "module_file": getattr(sys.modules.get(fn.__module__),
                                                                                      "__file__", None),
                "args": [_arg_spec(a) for a in args],
                "kwargs": {k: _arg_spec(v) for k, v in kwargs.items() if k not in ("grid", "warmup")}}
    except TypeError:
        return None


def request_key(request: dict) -> str:
    return json.dumps(request, sort_keys=True)


def attach_usage(launches: list[dict], arch: int) -> dict:
    """Compile the Triton launches (records with a ``compile_request``, which is removed) for compute
    capability ``arch`` and record ``USAGE_FIELDS`` on each. Returns how many configurations were compiled,
    the seconds it took and the failures ("kernel: error"; those launches are priced without the fields)."""
    import time

    triton = [launch for launch in launches if launch.get("compile_request")]
    start = time.perf_counter()
    usage = resource_usage([launch["compile_request"] for launch in triton], arch)
    failed = set()
    for launch in triton:
        found = usage.get(request_key(launch.pop("compile_request")), {})
        if "error" in found:
            failed.add(f"{launch['name']}: {found['error']}")
        launch.update({key: found[key] for key in USAGE_FIELDS if key in found})
    return {"configurations": len(usage), "seconds": time.perf_counter() - start, "failed": sorted(failed)}


def resource_usage(requests: list[dict], arch: int, timeout: float = 1800) -> dict:
    """Per ``request_key``: the compiled kernel's resource usage on compute capability ``arch``."""
    unique = {request_key(r): r for r in requests if r}
    if not unique:
        return {}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    done = subprocess.run([sys.executable, os.path.abspath(__file__), str(arch)],
                          input=json.dumps(list(unique.values())), capture_output=True, text=True, env=env,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"ledger_compile failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
    usage = json.loads(done.stdout)
    return dict(zip(unique, usage))


# ----------------------------------------------------------------------------- in the compiling process
def _jit_function(module_name: str, name: str, module_file: str | None):
    import importlib

    import triton

    try:
        module = importlib.import_module(module_name)
    except ImportError:
        if not module_file:
            raise
        import importlib.util

        spec = importlib.util.spec_from_file_location(module_name, module_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    kernel = getattr(module, name)
    while not isinstance(kernel, triton.runtime.JITFunction):  # @triton.heuristics / @triton.autotune wrappers
        kernel = kernel.fn
    return kernel


def _value(spec):
    import torch
    import triton.language as tl

    if "tensor" in spec:
        if spec.get("triton_dtype"):
            name = spec["tensor"]
            dtype = getattr(tl, name) if hasattr(tl, name) else tl.float32
            return _Pointer(dtype, spec["aligned"])
        tensor = torch.empty(16, dtype=getattr(torch, spec["tensor"]))
        return tensor if spec["aligned"] else tensor[1:]
    if "tl_dtype" in spec:
        return getattr(tl, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64",
                            "int32": "int32", "int64": "int64", "int8": "int8", "uint8": "uint8",
                            "int1": "int1"}.get(spec["tl_dtype"], spec["tl_dtype"]))
    return spec["value"]


class _Pointer:
    """A pointer argument of a reinterpreted dtype (what the JIT's specialisation reads of a tensor)."""

    def __init__(self, dtype, aligned: bool):
        self.dtype = dtype
        self._aligned = aligned

    def data_ptr(self):
        return 0 if self._aligned else 4


def _usage_of_cubin(cubin: bytes) -> dict:
    import re
    import tempfile

    from triton import knobs

    cuobjdump = os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    try:
        text = subprocess.run([cuobjdump, "--dump-resource-usage", handle.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(handle.name)
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {"registers": int(fields.get("REG", 0)), "stack_bytes": int(fields.get("STACK", 0)),
            "local_bytes": int(fields.get("LOCAL", 0)), "static_shared_bytes": int(fields.get("SHARED", 0))}


def _spills(ptx: str, arch: int) -> int:
    import re
    import tempfile

    from triton import knobs

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    try:
        log = subprocess.run([knobs.nvidia.ptxas.path, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}",
                              handle.name, "-o", handle.name + ".o"], capture_output=True, text=True).stderr
    finally:
        for path in (handle.name, handle.name + ".o"):
            if os.path.exists(path):
                os.unlink(path)
    stores = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))
    loads = sum(int(n) for n in re.findall(r"(\d+) bytes spill loads", log))
    return stores + loads


def _compile_one(request: dict, arch: int) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = _jit_function(request["module"], request["name"], request.get("module_file"))
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args = [_value(a) for a in request["args"]]
    kwargs = {k: _value(v) for k, v in request["kwargs"].items()}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    compiled = compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    usage = _usage_of_cubin(compiled.asm["cubin"])
    ttgir = compiled.asm["ttgir"]
    return {"registers": usage["registers"], "spill_bytes": _spills(compiled.asm["ptx"], arch),
            "shared_bytes": int(compiled.metadata.shared), "num_warps": int(compiled.metadata.num_warps),
            "num_stages": int(compiled.metadata.num_stages),
            # loads the software pipeliner turned into asynchronous copies issued ahead of their iteration
            "pipelined_loads": sum(ttgir.count(op) for op in PIPELINED_LOAD_OPS)}


def _main() -> int:
    arch = int(sys.argv[1])
    out = []
    for request in json.loads(sys.stdin.read()):
        try:
            out.append(_compile_one(request, arch))
        except Exception as error:  # reported per request: the launch is then priced without compiler data
            out.append({"error": f"{type(error).__name__}: {error}"[:300]})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
