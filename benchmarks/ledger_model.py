"""The roofline model of the performance ledger: modelled GPU time per launch from counted work.

Per launch (a Triton grid or an eager aten op), with the counts of ``ledger_count``:

    t = max(t_memory, t_tensor, t_cuda_core, t_sfu) + t_launch
    t_memory    = (bytes_read + bytes_written) / bandwidth
    t_tensor    = Σ_precision dot FLOPs / tensor-core peak of that precision (tf32, 3×tf32, bf16, fp16, fp64...)
    t_cuda_core = (fp32 IEEE dot FLOPs / 2 + lane ops + (INT_DIVMOD_COST − 1) · integer div/mod) / lane rate
    t_sfu       = transcendental ops / special-function-unit rate

and an op's modelled time is the sum over its launches. fp32 dots issued with input_precision="ieee" run
as FMAs on the CUDA cores (no tensor core), so they share the CUDA-core term with the lane operations (one
FMA = 2 FLOPs = one lane op); eager fp32 matrix products are priced the same way, as cuBLAS runs them under
PyTorch's default (TF32 off).

Devices
-------
* ``h100`` — H100 SXM5, datasheet: HBM3 3.35 TB/s; FP32 67 TFLOP/s; FP64 tensor core 67 TFLOP/s; TF32
  tensor core 989 TFLOP/s and BF16/FP16 1,979 TFLOP/s *with sparsity*, i.e. 494.7 and 989.4 dense (used
  here); FP8/INT8 1,979 dense. Source: NVIDIA H100 Tensor Core GPU datasheet,
  https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet (SXM column).
* ``h200`` — H200 SXM, datasheet: HBM3e 4.8 TB/s; the same compute figures as H100 SXM (FP32 67, TF32
  989* / BF16 1,979* with sparsity). Source: NVIDIA H200 Tensor Core GPU datasheet / product page,
  https://www.nvidia.com/en-us/data-center/h200/.
* ``h200_measured`` — H200 with the figures this workplace measured on a lent H200 (quoted from that
  run, not re-measured by the ledger): device-to-device copy ≈ 4.3 TB/s (read + write counted) and bf16
  matmul ≈ 790 TFLOP/s; FP16 is taken equal to BF16 and TF32 scaled by the same 790/989.4; every other
  figure is the datasheet's.
* Both chips: 132 SMs (GH100 as shipped in the SXM parts); the CUDA-core rate is 128 FP32 lanes per SM
  per clock and the SFU rate 16 per SM per clock (CUDA C++ Programming Guide, "Arithmetic Instructions",
  throughput table, compute capability 9.0). The clock is the one the datasheet's FP32 figure implies:
  67 TFLOP/s / (132 · 128 · 2) = 1.98 GHz, so lane rate = 33.5·10¹² ops/s and SFU rate = 4.18·10¹² ops/s.

Assumptions (model parameters, not measured): ``LAUNCH_US`` = 5 µs per launch (launch latency plus the
tail of a kernel; the figure attempts.md's predictions used), ``INT_DIVMOD_COST`` = 20 lane operations per
integer division or modulo (the GPU has no integer divider: a reciprocal estimate, multiplies and a
correction; 64-bit operands cost more).

A second figure, ``predicted_ms_perfect_cache``, charges each launch only the distinct bytes of each tensor
it touches (``distinct_bytes_*``): the opposite bound for the memory term. Where the two differ a lot (the
seg-head kernels gather their 5 MB of masks ~2.4 KB per pixel), the truth is in between and depends on
the caches, which neither figure models.

Calibrated model (second half of this file)
-------------------------------------------
``GPUS`` / ``GPU_NAMES``: datasheet figures of A100 (SXM4 / PCIe, 40 / 80 GB), H100 (SXM5 / PCIe / NVL) and
H200 (SXM / NVL), each with its source. ``CalibratedModel``: a host + GPU timeline of one ``do_bench`` call
(L2 flush, host issue costs, per-launch roofline with fitted achievable fractions, an L2 rule for repeated
accesses, a memory-latency bound, register-limited occupancy and spill traffic from an offline compile for
the GPU's architecture, a per-kernel floor); ``CALIBRATED_PARAMS`` fitted on Liger-Kernel's published H100
NVL rows by ``benchmarks/calibrate.py --fit`` (the fit and its errors beside them). The ledger's rows carry
its time as ``predicted_ms_calibrated``; the roofline above stays as it was.

Why the calibrated model has the terms it has (each found on a published row the plain roofline missed):

* host time shows when it is longer than do_bench's L2 flush: Liger's rms_norm ``full`` is flat at 0.21 ms
  from H = 1024 to 16384, far above its kernels' time — a Triton launch through an ``autograd.Function``
  costs tens of µs of Python (``triton_us`` + ``triton_arg_us`` per bound argument), entering the autograd
  engine ``backward_us``; eager ops cost ``aten_us`` (kernel) or ``host_op_us`` (a view, an allocation);
* achievable bandwidth depends on the code generator and the access: Triton kernels ``hbm_fraction``,
  PyTorch's dense pointwise kernels ``aten_pointwise_fraction``, pointwise kernels with a strided operand
  (not vectorised: eager rope's halves and transposes) ``aten_strided_fraction``, its reductions, norms,
  softmax and losses ``aten_hbm_fraction``;
* a loop that waits for its loads is latency-bound: Liger's norm backwards (one program per SM looping over
  rows) take ~0.07 ms whatever H; ``load_latency_us`` per dependent round (the busiest load site's calls),
  divided by the stages in flight where the compiler software-pipelined the loads (cp.async / TMA in the
  compiled kernel), plus ``reduce_latency_us`` per cross-warp reduction;
* registers decide occupancy and spills: Liger's rms_norm backward at H = 32768 (32 warps: 64 registers a
  thread) spills and runs 6× slower than at 16384; ptxas says so (``ledger_compile``), and the spilled
  bytes are priced at ``spill_fraction`` × HBM bandwidth; registers and shared memory bound the resident
  programs used by the L2 and latency terms;
* repeated accesses hit L2 in the share it can hold of what the resident programs share (Liger's
  cross-entropy reads each row twice; the second read is free at V = 32768 and not at 131072).

What the model leaves out (so "modelled" can be far from "measured")
-------------------------------------------------------------------
* caches: ``predicted_ms`` counts every load as DRAM traffic (L1/L2 hits — re-reads of a tile, the gathers
  of the seg-head kernels, the backward sweeps of cds_dice — are charged as if from HBM: an upper bound),
  ``predicted_ms_perfect_cache`` none twice; no store is merged;
* occupancy, waves and tails: a grid smaller than the SMs (or a last partial wave) is charged as if it
  filled the GPU; register pressure, spills and shared-memory limits are ignored;
* latency: dependent loads, pipelining (num_stages), atomics' contention (``atomic_max_per_address`` is
  reported, not priced) and synchronisation;
* overlap between launches (each launch's terms are maxed within the launch, then launches add up) and
  the CPU side (Python and dispatcher overhead of eager ops beyond ``LAUNCH_US``, host syncs);
* the compiler: lane operations are counted at Triton-IR level as the interpreter issues them — before
  common-subexpression elimination, loop-invariant hoisting, strength reduction and vectorisation — so
  integer and address arithmetic is over-counted; transcendentals count one SFU operation each (division
  and sqrt may take two);
* instruction issue limits, bank conflicts, uncoalesced or misaligned accesses (bytes are counted, not
  transactions: a strided gather of 4-byte values is charged 4 bytes per lane, not a 32-byte sector);
* eager ops: their lane operations are estimated from op tags, not counted; cuBLAS/cuDNN efficiency below
  peak; the caching allocator.
"""
from __future__ import annotations

from dataclasses import dataclass

LAUNCH_US = 5.0
INT_DIVMOD_COST = 20
SMS = 132
FP32_LANES_PER_SM_CLOCK = 128
SFU_PER_SM_CLOCK = 16


@dataclass(frozen=True)
class Device:
    name: str
    title: str
    bandwidth: float  # bytes/s, read + write
    fp32: float  # FLOP/s on CUDA cores (FMA = 2)
    tensor: dict  # precision -> dense FLOP/s
    source: str

    @property
    def clock_hz(self) -> float:
        return self.fp32 / (SMS * FP32_LANES_PER_SM_CLOCK * 2)

    @property
    def lane_rate(self) -> float:
        return SMS * FP32_LANES_PER_SM_CLOCK * self.clock_hz

    @property
    def sfu_rate(self) -> float:
        return SMS * SFU_PER_SM_CLOCK * self.clock_hz

    def to_json(self) -> dict:
        return {"title": self.title, "bandwidth_bytes_per_s": self.bandwidth, "fp32_flops": self.fp32,
                "tensor_flops": dict(self.tensor), "lane_ops_per_s": self.lane_rate,
                "sfu_ops_per_s": self.sfu_rate, "clock_hz": self.clock_hz, "source": self.source}


def _tensor_peaks(tf32: float, bf16: float, fp64: float, fp8: float) -> dict:
    return {"fp32_tf32": tf32, "fp32_tf32x3": tf32 / 3, "bf16": bf16, "fp16": bf16, "fp64": fp64,
            "fp8e4nv": fp8, "fp8e5": fp8, "int8": fp8}


_DATASHEET_TENSOR = _tensor_peaks(tf32=989.4e12 / 2, bf16=1978.9e12 / 2, fp64=67e12, fp8=3957.8e12 / 2)
_MEASURED_BF16 = 790e12

DEVICES = {
    "h100": Device("h100", "H100 SXM5 (datasheet)", 3.35e12, 67e12, _DATASHEET_TENSOR,
                   "NVIDIA H100 Tensor Core GPU datasheet (SXM); dense tensor-core figures = half the sparse ones"),
    "h200": Device("h200", "H200 SXM (datasheet)", 4.8e12, 67e12, _DATASHEET_TENSOR,
                   "NVIDIA H200 Tensor Core GPU datasheet (SXM); dense tensor-core figures = half the sparse ones"),
    "h200_measured": Device(
        "h200_measured", "H200, measured copy and bf16 matmul", 4.3e12, 67e12,
        {**_DATASHEET_TENSOR, "bf16": _MEASURED_BF16, "fp16": _MEASURED_BF16,
         "fp32_tf32": _DATASHEET_TENSOR["fp32_tf32"] * _MEASURED_BF16 / _DATASHEET_TENSOR["bf16"],
         "fp32_tf32x3": _DATASHEET_TENSOR["fp32_tf32x3"] * _MEASURED_BF16 / _DATASHEET_TENSOR["bf16"]},
        "copy ≈ 4.3 TB/s and bf16 matmul ≈ 790 TFLOP/s measured on a lent H200 (not re-measured by the ledger); "
        "the rest as the H200 datasheet"),
}


def launch_terms(launch: dict, device: Device, perfect_cache: bool = False) -> dict:
    """The model's terms (seconds) for one launch record (``Launch.to_json()`` form).

    ``perfect_cache``: charge the distinct bytes of each tensor the launch touches (each at most once)
    instead of every access — the bound a cache that never misses twice would give.
    """
    dot = dict(launch["dot_flops"])
    ieee = dot.pop("fp32_ieee", 0)
    lanes = dict(launch["lane_ops"])
    divmod_ops = lanes.get("int_divmod", 0)
    lane_ops = sum(lanes.values()) + (INT_DIVMOD_COST - 1) * divmod_ops
    tensor = 0.0
    for precision, flops in dot.items():
        peak = device.tensor.get(precision)
        if peak is None:
            raise ValueError(f"no peak for dot precision {precision!r} on {device.name}: add it to ledger_model")
        tensor += flops / peak
    return {
        "memory": (launch["distinct_bytes_read"] + launch["distinct_bytes_written"] if perfect_cache
                   else launch["bytes_read"] + launch["bytes_written"]) / device.bandwidth,
        "tensor": tensor,
        "cuda_core": (ieee / 2 + lane_ops) / device.lane_rate,
        "sfu": launch["transcendental_ops"] / device.sfu_rate,
        "launch": LAUNCH_US * 1e-6,
    }


def predict(launches: list[dict], device: Device, perfect_cache: bool = False) -> dict:
    """Modelled milliseconds of a sequence of launches, and the term that bounds most of that time."""
    total = 0.0
    bound_time = {"memory": 0.0, "tensor": 0.0, "cuda_core": 0.0, "sfu": 0.0, "launch": 0.0}
    for launch in launches:
        terms = launch_terms(launch, device, perfect_cache)
        work = {k: v for k, v in terms.items() if k != "launch"}
        limiting = max(work, key=work.get)
        bound_time[limiting] += work[limiting]
        bound_time["launch"] += terms["launch"]
        total += work[limiting] + terms["launch"]
    bound = max(bound_time, key=bound_time.get) if launches else "none"
    return {"ms": total * 1e3, "bound": bound, "ms_by_bound": {k: v * 1e3 for k, v in bound_time.items()}}


# ===================================================================================== datasheet GPUs
# The GPUs a published measurement can name, from their datasheets (dense tensor-core rates = half the
# "with sparsity" figures the datasheets print). Every figure carries its source in ``sources``. The
# calibrated model below (``CalibratedModel``) prices launches on these.
A100_DATASHEET = ("NVIDIA A100 Tensor Core GPU datasheet, https://www.nvidia.com/content/dam/en-zz/Solutions/"
                  "Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf")
A100_WHITEPAPER = ("NVIDIA A100 Tensor Core GPU Architecture whitepaper (108 SMs, 1410 MHz boost, 40 MB L2), "
                   "https://images.nvidia.com/aem-dam/en-zz/Solutions/data-center/"
                   "nvidia-ampere-architecture-whitepaper.pdf")
H100_DATASHEET = ("NVIDIA H100 Tensor Core GPU datasheet (SXM / PCIe / NVL columns), "
                  "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet")
H100_WHITEPAPER = ("NVIDIA H100 Tensor Core GPU Architecture whitepaper (SXM5 132 SMs, PCIe 114 SMs, 50 MB L2), "
                   "https://resources.nvidia.com/en-us-tensor-core/gtc22-whitepaper-hopper")
H100_NVL_SMS = ("H100 NVL: 132 SMs / 16,896 CUDA cores and 1785 MHz boost — TechPowerUp GPU database "
                "https://www.techpowerup.com/gpu-specs/h100-nvl.c4203, consistent with the datasheet's 60 TFLOP/s "
                "FP32 (132 SMs × 128 lanes × 2 × 1.785 GHz = 60.3 TFLOP/s)")
H200_DATASHEET = "NVIDIA H200 Tensor Core GPU product page / datasheet, https://www.nvidia.com/en-us/data-center/h200/"


@dataclass(frozen=True)
class GPU:
    """One GPU model's datasheet figures (SI units: bytes/s, FLOP/s, Hz, bytes)."""

    key: str
    title: str
    sms: int
    boost_clock_hz: float
    fp32_lanes_per_sm: int
    hbm_bandwidth: float  # bytes/s, read + write
    l2_bytes: int
    fp32: float  # CUDA-core FP32 FLOP/s (FMA = 2)
    tensor: dict  # precision -> dense tensor-core FLOP/s
    sources: dict  # figure -> source

    @property
    def lane_rate(self) -> float:
        return self.sms * self.fp32_lanes_per_sm * self.boost_clock_hz

    @property
    def compute_capability(self) -> int:
        """8.0 (A100) or 9.0 (H100, H200), as ``ledger_compile`` targets: 80 or 90."""
        return 80 if self.key.startswith("a100") else 90

    @property
    def shared_bytes_per_sm(self) -> int:
        """Shared memory a block can use per SM: 228 KB on Hopper, 164 KB on A100 (CUDA C++ Programming
        Guide, compute capabilities table)."""
        return (228 if self.compute_capability == 90 else 164) * 1024

    @property
    def sfu_rate(self) -> float:
        return self.sms * SFU_PER_SM_CLOCK * self.boost_clock_hz

    def to_json(self) -> dict:
        return {"title": self.title, "sms": self.sms, "boost_clock_hz": self.boost_clock_hz,
                "hbm_bandwidth_bytes_per_s": self.hbm_bandwidth, "l2_bytes": self.l2_bytes, "fp32_flops": self.fp32,
                "tensor_flops": dict(self.tensor), "sources": dict(self.sources)}


def _gpu(key, title, sms, clock_ghz, lanes, bandwidth_tb, l2_mb, fp32_tf, tf32_sparse_tf, bf16_sparse_tf, fp64_tc_tf,
         fp8_sparse_tf, sources) -> GPU:
    tensor = _tensor_peaks(tf32=tf32_sparse_tf * 1e12 / 2, bf16=bf16_sparse_tf * 1e12 / 2, fp64=fp64_tc_tf * 1e12,
                           fp8=fp8_sparse_tf * 1e12 / 2)
    return GPU(key, title, sms, clock_ghz * 1e9, lanes, bandwidth_tb * 1e12, int(l2_mb * 2**20), fp32_tf * 1e12,
               tensor, sources)


_A100 = {"bandwidth, FP32, tensor rates": A100_DATASHEET, "SMs, clock, L2": A100_WHITEPAPER}
_H100 = {"bandwidth, FP32, tensor rates": H100_DATASHEET, "SMs, L2": H100_WHITEPAPER}
# A100 has no FP8: its INT8 figure (624 TOPS dense) stands in the fp8 slots, which no A100 kernel uses.
GPUS = {g.key: g for g in (
    _gpu("a100_sxm_40gb", "A100 SXM4 40GB", 108, 1.41, 64, 1.555, 40, 19.5, 312, 624, 19.5, 1248, _A100),
    _gpu("a100_sxm_80gb", "A100 SXM4 80GB", 108, 1.41, 64, 2.039, 40, 19.5, 312, 624, 19.5, 1248, _A100),
    _gpu("a100_pcie_40gb", "A100 PCIe 40GB", 108, 1.41, 64, 1.555, 40, 19.5, 312, 624, 19.5, 1248, _A100),
    _gpu("a100_pcie_80gb", "A100 PCIe 80GB", 108, 1.41, 64, 1.935, 40, 19.5, 312, 624, 19.5, 1248, _A100),
    _gpu("h100_sxm", "H100 SXM5 80GB", 132, 1.98, 128, 3.35, 50, 67, 989, 1979, 67, 3958,
         {**_H100, "clock": "implied by the datasheet's 67 TFLOP/s FP32: 132 × 128 × 2 × 1.98 GHz"}),
    _gpu("h100_pcie", "H100 PCIe 80GB", 114, 1.755, 128, 2.0, 50, 51, 756, 1513, 51, 3026,
         {**_H100, "clock": "implied by the datasheet's 51 TFLOP/s FP32: 114 × 128 × 2 × 1.755 GHz"}),
    _gpu("h100_nvl", "H100 NVL 94GB", 132, 1.785, 128, 3.9, 50, 60, 835, 1671, 60, 3341,
         {**_H100, "SMs, clock": H100_NVL_SMS}),
    _gpu("h200_sxm", "H200 SXM 141GB", 132, 1.98, 128, 4.8, 50, 67, 989, 1979, 67, 3958,
         {"bandwidth, FP32, tensor rates": H200_DATASHEET, "SMs, clock, L2": "the GH100 of H100 SXM5: " + H100_WHITEPAPER}),
    _gpu("h200_nvl", "H200 NVL 141GB", 132, 1.785, 128, 4.8, 50, 60, 835, 1671, 60, 3341,
         {"bandwidth, FP32, tensor rates": H200_DATASHEET, "SMs, clock, L2": "as H100 NVL: " + H100_NVL_SMS}),
)}

# ``torch.cuda.get_device_name()`` strings (the ``gpu_name`` column of published measurements) → GPUS keys.
GPU_NAMES = {
    "NVIDIA A100-SXM4-40GB": "a100_sxm_40gb", "NVIDIA A100-SXM4-80GB": "a100_sxm_80gb",
    "NVIDIA A100-PCIE-40GB": "a100_pcie_40gb", "NVIDIA A100 80GB PCIe": "a100_pcie_80gb",
    "NVIDIA A100-PCIE-80GB": "a100_pcie_80gb",
    "NVIDIA H100 80GB HBM3": "h100_sxm", "NVIDIA H100 SXM5 80GB": "h100_sxm", "NVIDIA H100 PCIe": "h100_pcie",
    "NVIDIA H100 NVL": "h100_nvl", "NVIDIA H200": "h200_sxm", "NVIDIA H200 NVL": "h200_nvl",
}


def gpu_for_name(gpu_name: str) -> GPU:
    """The datasheet GPU a ``torch.cuda.get_device_name()`` string names; a ValueError naming it otherwise."""
    key = GPU_NAMES.get(gpu_name.strip())
    if key is None:
        raise ValueError(f"unknown gpu_name {gpu_name!r}: add it to GPU_NAMES in benchmarks/ledger_model.py "
                         f"(known: {', '.join(sorted(GPU_NAMES))})")
    return GPUS[key]


# ================================================================================ the calibrated model
# Fitted on Liger-Kernel 0.5.2's published H100 NVL rows (216 speed rows; `benchmarks/calibrate.py --fit`: from
# START_PARAMS, Nelder-Mead and a coordinate search on the mean |log(predicted / measured)| of the times and of
# the liger-over-huggingface speedups), 2026-12-07. The fit: speed median |pred/meas - 1| 8.8 %, 90th
# percentile 35.0 %; speedup median error 8.2 %; leave-one-kernel-out medians cross_entropy 7.2 %, geglu 2.9 %,
# layer_norm 11.5 %, rms_norm 15.1 %, rope 25.9 %, swiglu 3.1 % (benchmarks/RESULTS.md). Global: none is per
# kernel; the bandwidth fractions are per code generator and access kind (Triton kernels; PyTorch's dense
# pointwise, strided pointwise and other kernels). Only the H100 NVL has been fitted: on other GPUs the same
# fractions and host costs are assumed. The parameters trade against each other — load_latency_us held at 0.6
# fits the rows about as well (`--fix load_latency_us=0.6`: 12.2 % / 36.0 % / 8.4 %) — so read them as a fit,
# not as measurements of each quantity.
CALIBRATED_PARAMS = {
    "hbm_fraction": 0.760831,  # achievable share of the datasheet HBM bandwidth (read + write), Triton kernels
    "aten_hbm_fraction": 0.45055,  # the same for PyTorch's eager reduction, norm, softmax and loss kernels
    "aten_pointwise_fraction": 0.697812,  # ... its pointwise and copy kernels on dense operands (vectorised)
    "aten_strided_fraction": 0.220009,  # ... its pointwise and copy kernels with a strided operand (not vectorised)
    "tensor_fraction": 0.58457,  # achievable share of the dense tensor-core peak (cuBLAS at these shapes)
    "spill_fraction": 0.82665,  # local-memory (spill) traffic served at this multiple of the HBM bandwidth
    "reduce_latency_us": 0.0711622,  # one cross-warp reduction of a program (shared memory and barriers)
    "load_latency_us": 3.13454,  # one dependent round of a program's loads (an iteration of a loop that waits for them)
    "kernel_floor_us": 3.74692,  # GPU time of an empty kernel plus the gap between two kernels
    "call_us": 28.8738,  # host: the timed Python call itself (and the CUDA event record)
    "aten_us": 9.36737,  # host: one eager aten op that launches a kernel (dispatcher, allocator, launch)
    "triton_us": 39.9004,  # host: one Triton launch from Python through an autograd.Function (the fixed part)
    "triton_arg_us": 1.14849,  # host: per argument of a Triton launch (binding, the specialisation key)
    "host_op_us": 2.37687,  # host: an aten op that launches no kernel (a view, an allocation)
    "backward_us": 71.9356,  # host: entering the autograd engine (.backward / autograd.grad)
    "fused_us": 1.75798,  # host: one kernel of a torch.compile'd graph (inductor's generated launcher)
    "graph_us": 127.73,  # host: entering the compiled forward graph (guards, the AOTAutograd wrapper)
    "compiled_backward_us": 117.118,  # host: entering the compiled backward graph (from the autograd engine)
}
# Where every fit starts (``calibrate.py --fit`` and each leave-one-kernel-out refit): hand-set guesses of
# the same quantities, not fitted, so that a held-out kernel's rows cannot reach its refit through the
# starting point.
START_PARAMS = {
    "hbm_fraction": 0.8, "aten_hbm_fraction": 0.6, "aten_pointwise_fraction": 0.8, "aten_strided_fraction": 0.4,
    "tensor_fraction": 0.6, "spill_fraction": 1.0, "load_latency_us": 1.0, "reduce_latency_us": 1.0,
    "kernel_floor_us": 5.0, "call_us": 15.0, "aten_us": 5.0, "triton_us": 20.0, "triton_arg_us": 0.5,
    "host_op_us": 1.0, "backward_us": 30.0, "fused_us": 5.0, "graph_us": 100.0, "compiled_backward_us": 100.0,
}
FLUSH_BYTES = 256 * 2**20  # triton.testing.do_bench zeroes a 256 MB buffer before every timed call


def cublas_workspace_bytes(gpu: GPU) -> int:
    """The cuBLAS workspace PyTorch allocates through its caching allocator on the first matmul of a stream:
    ``:4096:8`` (8 × 4 MiB) on compute capability 9.x, ``:4096:2:16:8`` elsewhere (PyTorch,
    aten/src/ATen/cuda/CublasHandlePool.cpp, ``getChosenWorkspaceSize``)."""
    hopper = gpu.key.startswith(("h100", "h200"))
    return 8 * 4096 * 1024 if hopper else 2 * 4096 * 1024 + 8 * 16 * 1024


# What CalibratedModel reads of a launch record (``Launch.to_json()`` or calibrate's counts): a ledger row's
# ``timeline`` keeps these, so a refitted model can re-price it (calibrate.py --ledger).
TIMELINE_FIELDS = ("kind", "name", "phase", "bytes_read", "bytes_written", "dot_flops", "lane_ops", "transcendental_ops",
                   "grid", "load_calls", "load_rounds", "reduce_calls", "num_args", "registers", "spill_bytes",
                   "shared_bytes", "num_stages", "pipelined_loads", "op_class")


def timeline_entry(launch: dict) -> dict:
    """The fields of ``TIMELINE_FIELDS`` a launch record has, and its num_warps."""
    entry = {k: launch[k] for k in TIMELINE_FIELDS if launch.get(k) is not None}
    entry["num_warps"] = launch.get("num_warps", launch.get("config", {}).get("num_warps", 4))
    return entry


def _num_warps(launch: dict) -> int:
    return int(launch.get("num_warps", launch.get("config", {}).get("num_warps", 4)))


REGISTERS_PER_SM = 65536  # 32-bit registers per SM on compute capability 8.0 and 9.0
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32


def resident_programs(launch: dict, gpu: GPU) -> float:
    """Programs of a Triton launch that run at once: per SM the fewest that warps (64 per SM), registers
    (65,536 per SM, allocated per warp in multiples of 8 per thread) and shared memory allow, where the
    launch carries its compiled usage (``ledger_compile``); else the warp limit only."""
    warps = _num_warps(launch)
    per_sm = min(MAX_BLOCKS_PER_SM, max(1, MAX_WARPS_PER_SM // warps))
    registers = launch.get("registers")
    if registers:
        per_sm = min(per_sm, max(1, REGISTERS_PER_SM // (-(-registers // 8) * 8 * 32 * warps)))
    shared = launch.get("shared_bytes")
    if shared:
        per_sm = min(per_sm, max(1, gpu.shared_bytes_per_sm // shared))
    return min(max(1.0, launch.get("grid", 1)), gpu.sms * per_sm)


def spill_traffic(launch: dict) -> float:
    """Local-memory bytes a Triton launch's spills move: the spill stores and loads per thread in its code
    (ptxas), for every thread, once per round of its busiest loop (``load_rounds`` per program, at least 1)."""
    spill = launch.get("spill_bytes") or 0
    if not spill:
        return 0.0
    grid = max(1.0, launch.get("grid", 1))
    rounds = max(1.0, launch.get("load_rounds", 0) / grid)
    return spill * 32 * _num_warps(launch) * grid * rounds


class CalibratedModel:
    """Time of one timed call (``do_bench``'s ``fn``) from its launches in issue order.

    GPU per launch: ``max(HBM bytes / (fraction · HBM) + spill bytes / (spill_fraction · HBM), dot FLOPs /
    (tensor_fraction · peak), lane ops / lane rate, transcendentals / SFU rate, memory latency) +
    kernel_floor``, the fraction by code generator and access kind (see ``dram_bytes``, ``spill_traffic``,
    ``latency_seconds``).
    Host: the call costs ``call_us``, each launch its issue cost (``aten_us``; ``triton_us`` +
    ``triton_arg_us`` per argument; ``fused_us``; ``host_op_us`` for a launch of kind ``host``, which runs
    nothing on the GPU), entering backward ``backward_us``, a compiled graph ``graph_us`` /
    ``compiled_backward_us`` per phase; a ``sync`` launch (``.item()``) waits for the GPU. A launch starts on
    the GPU when the host has issued it and the previous one has finished. The clock starts when the GPU has
    finished do_bench's L2 flush (``FLUSH_BYTES`` written), which the host overlaps with issuing the call:
    host work shorter than the flush is hidden, longer host work shows (the ~0.2 ms floor of Liger's
    rms_norm ``full``). Returns milliseconds.
    """

    def __init__(self, params: dict | None = None):
        self.p = dict(CALIBRATED_PARAMS if params is None else params)

    @staticmethod
    def dram_bytes(launch: dict, gpu: GPU) -> float:
        """A launch's HBM traffic. Aten launches: their counted bytes (each op reads its inputs and writes its
        outputs once). Triton launches, per tensor argument: its first touch of each byte from HBM, and
        repeated accesses from L2 in the share ``min(1, L2 / part)`` where ``part`` is the tensor's part that
        the resident programs share (its size × resident programs / grid, at most its size; a tensor every
        program reads, such as a norm's weight, stays whole), the rest from HBM again. Resident programs:
        grid or SMs × 64 warps / num_warps."""
        traffic = launch.get("tensor_traffic")
        if not traffic:
            return launch["bytes_read"] + launch["bytes_written"]
        grid = max(1.0, launch.get("grid", 1))
        resident = resident_programs(launch, gpu)
        total = 0.0
        for size, read, written in traffic:
            for accessed in (read, written):
                if size <= 0:
                    total += accessed
                    continue
                first = min(accessed, size)
                shared = size * min(1.0, resident / grid)
                hit = min(1.0, gpu.l2_bytes / shared)
                total += first + (1.0 - hit) * (accessed - first)
        return total

    def gpu_seconds(self, launch: dict, gpu: GPU) -> float:
        p = self.p
        if launch["kind"] != "aten":
            fraction = p["hbm_fraction"]
        else:
            fraction = p[{"pointwise": "aten_pointwise_fraction", "strided": "aten_strided_fraction"}.get(
                launch.get("op_class"), "aten_hbm_fraction")]
        memory = (self.dram_bytes(launch, gpu) / (fraction * gpu.hbm_bandwidth)
                  + spill_traffic(launch) / (p["spill_fraction"] * gpu.hbm_bandwidth))
        tensor = cuda = 0.0
        for precision, flops in launch["dot_flops"].items():
            if precision == "fp32_ieee":
                cuda += flops / 2 / gpu.lane_rate
            else:
                tensor += flops / (p["tensor_fraction"] * gpu.tensor[precision])
        lanes = launch["lane_ops"]
        cuda += (sum(lanes.values()) + (INT_DIVMOD_COST - 1) * lanes.get("int_divmod", 0)) / gpu.lane_rate
        sfu = launch["transcendental_ops"] / gpu.sfu_rate
        return max(memory, tensor, cuda, sfu, self.latency_seconds(launch, gpu)) + p["kernel_floor_us"] * 1e-6

    def latency_seconds(self, launch: dict, gpu: GPU) -> float:
        """A Triton launch's memory latency bound: a program's dependent round trips (``load_rounds``: the
        most times one of its load sites ran — one per iteration of a loop that waits for its loads, as
        Liger's norm backwards do with a grid of one program per SM) are served one after the other
        (``load_latency_us`` each), for each wave of resident programs; the independent loads of one
        iteration are in flight together; where the compiler software-pipelined the loads (``pipelined_loads``)
        ``num_stages`` − 1 rounds are in flight. Each reduction (``reduce_calls``: a cross-warp exchange through
        shared memory with barriers) adds ``reduce_latency_us``. Timelines without ``load_rounds`` (older
        ledgers) use every load."""
        rounds = launch.get("load_rounds", launch.get("load_calls", 0))
        reduces = launch.get("reduce_calls", 0)
        if not (rounds or reduces) or launch["kind"] != "triton":
            return 0.0
        grid = max(1.0, launch.get("grid", 1))
        resident = resident_programs(launch, gpu)
        waves = -(-grid // resident)
        round_us = self.p["load_latency_us"]
        if launch.get("pipelined_loads"):  # loads issued num_stages - 1 iterations ahead: that many in flight
            round_us /= max(1, launch.get("num_stages", 3) - 1)
        return waves * ((rounds / grid) * round_us + (reduces / grid) * self.p["reduce_latency_us"]) * 1e-6

    def call_ms(self, launches: list[dict], gpu: GPU, provider: str) -> float:
        p = self.p
        us = 1e-6
        flush = FLUSH_BYTES / (p["aten_hbm_fraction"] * gpu.hbm_bandwidth) + p["kernel_floor_us"] * us
        host, gpu_free = p["call_us"] * us, flush
        phase = None
        for launch in launches:
            if launch["phase"] != phase:
                phase = launch["phase"]
                if phase == "backward":
                    host += p["backward_us"] * us
                if provider == "torchcompile":
                    host += p["compiled_backward_us" if phase == "backward" else "graph_us"] * us
            kind = launch["kind"]
            if kind == "sync":
                host = max(host, gpu_free)
                continue
            if kind == "host":
                host += p["host_op_us"] * us
                continue
            if kind == "triton":
                host += (p["triton_us"] + p["triton_arg_us"] * launch.get("num_args", 0)) * us
            else:
                host += {"aten": p["aten_us"], "fused": p["fused_us"]}[kind] * us
            gpu_free = max(host, gpu_free) + self.gpu_seconds(launch, gpu)
        return (max(gpu_free, host) - flush) * 1e3


def fit_params(cases: list[tuple], start: dict, iterations: int = 1500, pairs: list[tuple] = (),
               restarts: int = 3, fixed: frozenset = frozenset()) -> dict:
    """Parameters minimising the mean |log(predicted / measured)| over ``cases`` (launches, gpu, provider,
    measured ms) plus, over ``pairs`` (index of a liger case, index of its huggingface case), the mean
    |log(predicted speedup / measured speedup)|: Nelder–Mead on the logarithms of the parameters (all
    positive; fractions capped at 1), restarted ``restarts`` times from a fresh simplex around the best
    point (a simplex in 17 dimensions collapses before it has explored), each run followed by a coordinate
    search. Parameters that price nothing in the cases, and those in ``fixed``, keep their start value."""
    import numpy as np

    names = list(start)
    x0 = np.log([start[n] for n in names])
    log_measured = np.log([c[3] for c in cases])
    pairs = list(pairs)
    liger_index = np.array([a for a, _ in pairs], dtype=int)
    hf_index = np.array([b for _, b in pairs], dtype=int)

    def params_of(x):
        values = dict(zip(names, np.exp(x)))
        for name in ("hbm_fraction", "aten_hbm_fraction", "aten_pointwise_fraction", "aten_strided_fraction",
                     "tensor_fraction"):
            values[name] = min(values[name], 1.0)
        return values

    def loss(x):
        model = CalibratedModel(params_of(x))
        error = np.log([max(model.call_ms(c[0], c[1], c[2]), 1e-9) for c in cases]) - log_measured
        total = float(np.mean(np.abs(error)))
        if pairs:
            total += float(np.mean(np.abs(error[hf_index] - error[liger_index])))
        return total

    # A parameter that prices nothing in the cases (no strided eager op, no spill among them) stays at its
    # start; the search would otherwise drift it anywhere.
    used = _priced_parameters(cases) - set(fixed)
    free = [i for i, name in enumerate(names) if name in used]

    def loss_free(z):
        x = x0.copy()
        x[free] = z
        return loss(x)

    best = x0[free]
    for _ in range(max(1, restarts)):
        best = _nelder_mead(loss_free, best, iterations)
        best = _coordinate_search(loss_free, best)
    x = x0.copy()
    x[free] = best
    return {k: float(v) for k, v in params_of(x).items()}


def _priced_parameters(cases: list[tuple]) -> set:
    """The parameters of CalibratedModel that price some launch of ``cases`` (launches, gpu, provider, ms)."""
    used = {"call_us", "kernel_floor_us"}
    for launches, _, provider, _ in cases:
        if provider == "torchcompile":
            used |= {"graph_us", "compiled_backward_us"}
        for launch in launches:
            kind = launch["kind"]
            if launch.get("phase") == "backward":
                used.add("backward_us")
            if kind == "host":
                used.add("host_op_us")
            elif kind == "aten":
                used.add("aten_us")
                used.add({"pointwise": "aten_pointwise_fraction", "strided": "aten_strided_fraction"}.get(
                    launch.get("op_class"), "aten_hbm_fraction"))
            elif kind == "triton":
                used |= {"triton_us", "triton_arg_us", "hbm_fraction"}
                if launch.get("load_rounds", launch.get("load_calls")):
                    used.add("load_latency_us")
                if launch.get("reduce_calls"):
                    used.add("reduce_latency_us")
                if launch.get("spill_bytes"):
                    used.add("spill_fraction")
            elif kind == "fused":
                used |= {"fused_us", "hbm_fraction"}
            if any(p != "fp32_ieee" and f for p, f in launch.get("dot_flops", {}).items()):
                used.add("tensor_fraction")
    return used


def _coordinate_search(loss, x, rounds: int = 3):
    """One parameter at a time, the best of a few multiplicative steps (Nelder–Mead stalls in valleys that
    run along a single parameter, such as a host cost that only a few rows see)."""
    import numpy as np

    value = loss(x)
    for _ in range(rounds):
        improved = False
        for i in range(len(x)):
            for step in (-0.7, -0.35, -0.15, 0.15, 0.35, 0.7):
                trial = x.copy()
                trial[i] += step
                trial_value = loss(trial)
                if trial_value < value - 1e-9:
                    x, value, improved = trial, trial_value, True
        if not improved:
            break
    return x


def _nelder_mead(loss, x0, iterations: int, step: float = 0.3):
    import numpy as np

    simplex = [x0] + [x0 + np.eye(len(x0))[i] * step for i in range(len(x0))]
    values = [loss(x) for x in simplex]
    for _ in range(iterations):
        order = np.argsort(values)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        centroid = np.mean(simplex[:-1], axis=0)
        reflected = centroid + (centroid - simplex[-1])
        fr = loss(reflected)
        if fr < values[0]:
            expanded = centroid + 2 * (centroid - simplex[-1])
            fe = loss(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = centroid + 0.5 * (simplex[-1] - centroid)
            fc = loss(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                simplex = [simplex[0]] + [simplex[0] + 0.5 * (s - simplex[0]) for s in simplex[1:]]
                values = [values[0]] + [loss(s) for s in simplex[1:]]
        if max(values) - min(values) < 1e-7:
            break
    return simplex[int(np.argmin(values))]
