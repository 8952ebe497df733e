"""Liger-Kernel's benchmark calls, rebuilt on the CPU so that the ledger's counters can count them.

Each function here transcribes one of Liger-Kernel's ``benchmark/scripts/benchmark_<kernel>.py`` (repository
linkedin/Liger-Kernel, commit ``LIGER_SCRIPTS_COMMIT``, the commit the published H100 NVL data names): the
same modules and tensors, dtypes, ``requires_grad``, the tensors created inside the timed call, and which
of them ``do_bench`` resets (``grad_to_none``). Only the size of one *scaled* dimension (the rows: M, B·T,
the sequence) is replaced by a small value, because every workload here is linear in it
(``calibrate.py`` counts at two small values and extrapolates; ``tests/test_calibrate.py`` checks it).

Providers:
* ``liger`` — Liger's own modules at the row's ``liger_version``, imported from ``.liger-<version>/`` at
  the repository root (``pip install --no-deps --target .liger-0.5.2 liger-kernel==0.5.2``); their Triton
  kernels run through Triton's interpreter. Liger's ``transformers`` package imports Hugging Face
  transformers at its top, so the module files are loaded one by one, by path.
* ``huggingface`` — the eager PyTorch modules the scripts compare with, transcribed here from
  transformers' ``modeling_llama`` (``LlamaRMSNorm``, ``LlamaMLP``, ``apply_rotary_pos_emb``,
  ``LlamaRotaryEmbedding``; the scripts' own copy for RMSNorm) and torch (``nn.LayerNorm``,
  ``nn.CrossEntropyLoss``): transformers is not a dependency of this project.
* ``torchcompile`` — the same eager modules; its launches are those of ``huggingface`` regrouped by the
  fusion model of ``calibrate.py`` (no inductor run: inductor on a CPU emits C++, not the GPU's kernels).

Two deliberate changes to Liger's code, both where a CPU run would differ from the GPU's:
* the ``libdevice`` ``rsqrt`` and ``tanh`` Liger imports by name are not implemented by Triton's interpreter
  (it patches ``triton.language`` and its ``math`` only): the kernels get ``tl.math.rsqrt`` (the same
  operation) and a ``tanh`` from ``tl.exp`` (2 SFU operations where libdevice's costs a few; GEGLU's time is
  its matmuls').
*  Liger's norm backwards ask the CUDA device for its SM count (the grid
and the ``(sm_count, N)`` partial-gradient buffer) and take 1 on a CPU; here they get the modelled GPU's
SM count, so the grid, the buffer and its reduction are those of the GPU run.
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
LIGER_SCRIPTS_COMMIT = "3534d4461ca89319e29c890c1a4c20cb2a615d5f"
KERNELS = ("rms_norm", "layer_norm", "cross_entropy", "swiglu", "geglu", "rope")
PROVIDERS = ("liger", "huggingface", "torchcompile")
DTYPES = {"torch.bfloat16": torch.bfloat16, "torch.float32": torch.float32, "torch.float16": torch.float16}


class LigerMissing(RuntimeError):
    """Liger-Kernel of the wanted version is not installed where calibrate looks for it."""


def liger_dir(version: str) -> Path:
    return ROOT / f".liger-{version}"


def load_liger(version: str, sms: int) -> dict:
    """Liger-Kernel ``version``'s modules the scripts use, from ``.liger-<version>/`` (its norm backwards
    given ``sms`` SMs, see the module docstring). Raises ``LigerMissing`` with the install command."""
    path = liger_dir(version)
    if not (path / "liger_kernel").is_dir() or not (path / f"liger_kernel-{version}.dist-info").is_dir():
        raise LigerMissing(f"Liger-Kernel {version} not found in {path}: install it without its dependencies with "
                           f"`pip install --no-deps --target {path.name} liger-kernel=={version}` at the repository root")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import liger_kernel

    if Path(liger_kernel.__file__).resolve().parent != (path / "liger_kernel").resolve():
        raise LigerMissing(f"liger_kernel was already imported from {liger_kernel.__file__}, not from {path}")
    import liger_kernel.ops.layer_norm as ln_ops
    import liger_kernel.ops.rms_norm as rms_ops

    import liger_kernel.ops.cross_entropy as ce_ops
    import liger_kernel.ops.geglu as geglu_ops

    for ops, name in ((rms_ops, "rms_norm_backward"), (ln_ops, "layer_norm_backward")):
        _give_sm_count(ops, name, sms)
    rms_ops.rsqrt = ln_ops.rsqrt = interpreted_rsqrt
    ce_ops.tanh = geglu_ops.tanh = interpreted_tanh
    modules = {}
    for name in ("rms_norm", "layer_norm", "cross_entropy", "swiglu", "geglu", "rope"):
        spec = importlib.util.spec_from_file_location(f"_liger_{version}_{name}",
                                                      path / "liger_kernel" / "transformers" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules[name] = module
    return modules


@triton.jit
def interpreted_rsqrt(x):
    """libdevice's rsqrt for the interpreter."""
    return tl.math.rsqrt(x)


@triton.jit
def interpreted_tanh(x):
    """libdevice's tanh for the interpreter: 1 − 2 / (e^{2x} + 1) (±1 where e^{2x} over- or underflows)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


def _give_sm_count(ops_module, function_name: str, sms: int) -> None:
    """Re-define ``function_name`` in ``ops_module`` with its CPU default ``sm_count = 1`` replaced by ``sms``."""
    function = getattr(ops_module, function_name)
    original = getattr(function, "__wrapped_sm_count__", function)
    source = inspect.getsource(original)
    if source.count("sm_count = 1\n") != 1:
        raise LigerMissing(f"{ops_module.__name__}.{function_name} no longer sets `sm_count = 1` once: "
                           "calibrate_workloads cannot give it the GPU's SM count")
    namespace: dict = {}
    exec(compile(source.replace("sm_count = 1\n", f"sm_count = {int(sms)}\n"), inspect.getsourcefile(original), "exec"),
         ops_module.__dict__, namespace)
    patched = namespace[function_name]
    patched.__wrapped_sm_count__ = original
    setattr(ops_module, function_name, patched)


# ------------------------------------------------------------------------- the eager modules (transcribed)
class LlamaRMSNorm(nn.Module):
    """The script's copy of transformers' LlamaRMSNorm (an fp32 weight: its output is fp32 for bf16 input)."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LlamaMLP(nn.Module):
    """transformers' LlamaMLP (no bias): down(act(gate(x)) · up(x)); ``silu`` or ``gelu_pytorch_tanh``."""

    def __init__(self, hidden_size, intermediate_size, hidden_act):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        acts = {"silu": F.silu, "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh")}
        if hidden_act not in acts:
            raise ValueError(f"hidden_act {hidden_act!r}: the transcription knows {sorted(acts)}")
        self.act_fn = acts[hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb (``position_ids`` unused, as there)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def llama_rotary_cos_sin(x, position_ids, head_dim, base=10000.0):
    """transformers' LlamaRotaryEmbedding forward (default rope, scaling 1): cos and sin in x's dtype."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    inv_freq_expanded = inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    position_ids_expanded = position_ids[:, None, :].float()
    freqs = (inv_freq_expanded @ position_ids_expanded).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


# ----------------------------------------------------------------------------------------- the calls
@dataclass
class Bench:
    """One benchmark call: ``forward()`` → output; ``backward(output)``; what ``do_bench`` resets."""

    forward: Callable
    backward: Callable
    grad_to_none: list
    uses_matmul: bool = False  # any cuBLAS call in the script's process (its workspace is allocated memory)
    keep: dict = field(default_factory=dict)  # the script's other live objects (modules of other providers)

    def call(self, mode: str, phase: Callable[[str], None], state: dict):
        """Run ``mode`` once as the timed lambda does (``state`` holds the backward mode's output; its
        ``output``: the forward's output of this call, for the fusion model)."""
        if mode == "forward":
            phase("forward")
            state["output"] = self.forward()
            return state["output"]
        if mode == "backward":
            if "y" not in state:
                phase("setup")
                state["y"] = self.forward()
            phase("backward")
            return self.backward(state["y"])
        phase("forward")
        y = state["output"] = self.forward()
        phase("backward")
        self.backward(y)
        return None


@dataclass(frozen=True)
class Row:
    """What calibrate needs of one CSV row's workload: the kernel, provider, swept value and fixed config."""

    kernel: str
    provider: str
    x_name: str
    x_value: int
    config: dict

    @property
    def scaled_dim(self) -> str:
        return {"rms_norm": "M", "layer_norm": "M", "cross_entropy": "BT", "swiglu": "T", "geglu": "T",
                "rope": "seq_len"}[self.kernel]

    def full_scale(self) -> int:
        """The scaled dimension's size in the measured run."""
        c = self.config
        if self.kernel in ("rms_norm", "layer_norm"):
            return int(c["M"])
        if self.kernel == "cross_entropy":
            return int(c["B"]) * int(c["T"])
        if self.kernel in ("swiglu", "geglu"):
            return self.x_value
        return int(c["seq_len"]) if "seq_len" in c else self.x_value

    def workload_key(self) -> tuple:
        """Rows with equal keys run the same call but for the scaled dimension (torchcompile: huggingface's)."""
        x_is_scaled = self.kernel in ("swiglu", "geglu") or (self.kernel == "rope" and "hidden_size" in self.config)
        return (self.kernel, "huggingface" if self.provider == "torchcompile" else self.provider,
                None if x_is_scaled else self.x_value, tuple(sorted((k, str(v)) for k, v in self.config.items())))


def build(row: Row, scale: int, liger: dict | None) -> Bench:
    """The benchmark call of ``row`` with its scaled dimension set to ``scale``; ``liger``: ``load_liger``'s
    modules (needed for the liger provider)."""
    provider = "huggingface" if row.provider == "torchcompile" else row.provider
    if provider == "liger" and liger is None:
        raise LigerMissing("the liger provider needs Liger-Kernel's modules (load_liger)")
    return _BUILDERS[row.kernel](row, provider, scale, liger)


def _rms_norm(row: Row, provider: str, M: int, liger) -> Bench:
    c, N = row.config, row.x_value
    eps, dtype = float(c["eps"]), DTYPES[c["dtype"]]
    modules = {"liger": liger["rms_norm"].LigerRMSNorm(hidden_size=N, eps=eps) if liger else None,
               "huggingface": LlamaRMSNorm(hidden_size=N, eps=eps),
               "compiled": LlamaRMSNorm(hidden_size=N, eps=eps)}  # the script builds all three
    x = torch.randn((M, N), dtype=dtype)
    dy = torch.randn_like(x)
    x.requires_grad_(True)
    layer = modules[provider]
    return Bench(lambda: layer(x), lambda y: y.backward(dy, retain_graph=True), [x], keep=modules)


def _layer_norm(row: Row, provider: str, M: int, liger) -> Bench:
    c, N = row.config, row.x_value
    eps, dtype = float(c["eps"]), DTYPES[c["dtype"]]
    modules = {"liger": liger["layer_norm"].LigerLayerNorm(hidden_size=N) if liger else None,
               "huggingface": nn.LayerNorm(N, eps=eps)}  # torch.compile(torch_ln) shares the same parameters
    x = torch.randn((M, N), dtype=dtype)
    dy = torch.randn_like(x)
    x.requires_grad_(True)
    layer = modules[provider]
    return Bench(lambda: layer(x), lambda y: y.backward(dy, retain_graph=True), [x], keep=modules)


def _cross_entropy(row: Row, provider: str, BT: int, liger) -> Bench:
    V = row.x_value
    loss = liger["cross_entropy"].LigerCrossEntropyLoss() if provider == "liger" else nn.CrossEntropyLoss()
    logits = torch.randn(BT, V, requires_grad=True)
    target = torch.randint(V, (BT, 1)).squeeze(1)
    # forward and full pass no grad_to_none: the logits' gradient accumulates from the second call on
    return Bench(lambda: loss(logits, target), lambda y: y.backward(), [], keep={"target": target})


def _mlp(kind: str):
    def make(row: Row, provider: str, T: int, liger) -> Bench:
        c = row.config
        bsz = int(c["B"] if "B" in c else c["bsz"])
        hidden, inter, act = int(c["hidden_size"]), int(c["intermediate_size"]), c["hidden_act"]
        dtype = DTYPES[c["dtype"]]
        x = torch.randn(bsz, T, hidden, dtype=dtype, requires_grad=True)
        if provider == "liger":
            config = type("LlamaConfig", (), {"hidden_size": hidden, "intermediate_size": inter, "hidden_act": act})()
            cls = liger["swiglu"].LigerSwiGLUMLP if kind == "swiglu" else liger["geglu"].LigerGEGLUMLP
            layer = cls(config=config)
        else:
            layer = LlamaMLP(hidden, inter, act)
        layer = layer.to(dtype)
        # the upstream gradient is drawn inside the timed call
        return Bench(lambda: layer(x), lambda y: y.backward(torch.randn_like(y), retain_graph=True), [x],
                     uses_matmul=True, keep={"layer": layer})

    return make


def _rope(row: Row, provider: str, seq_len: int, liger) -> Bench:
    c = row.config
    nq, nkv, dtype = int(c["num_q_heads"]), int(c["num_kv_heads"]), DTYPES[c["dtype"]]
    hidden = int(c["hidden_size"]) if "hidden_size" in c else row.x_value
    head_dim = hidden // nq
    q = torch.randn((1, seq_len, nq, head_dim), requires_grad=True, dtype=dtype).transpose(1, 2)
    k = torch.randn((1, seq_len, nkv, head_dim), requires_grad=True, dtype=dtype).transpose(1, 2)
    dq, dk = torch.randn_like(q, dtype=dtype), torch.randn_like(k)
    pos_ids = torch.arange(seq_len, dtype=torch.long).unsqueeze(0)
    cos, sin = llama_rotary_cos_sin(k, pos_ids, head_dim)
    apply = liger["rope"].liger_rotary_pos_emb if provider == "liger" else apply_rotary_pos_emb

    def backward(out):
        return torch.autograd.grad(out, (q, k), (dq, dk), allow_unused=True, retain_graph=True)

    return Bench(lambda: apply(q, k, cos, sin, pos_ids), backward, [q, k], uses_matmul=True,
                 keep={"cos": cos, "sin": sin})


_BUILDERS = {"rms_norm": _rms_norm, "layer_norm": _layer_norm, "cross_entropy": _cross_entropy,
             "swiglu": _mlp("swiglu"), "geglu": _mlp("geglu"), "rope": _rope}


SMALL_SCALES = (2, 4)  # the two sizes of the scaled dimension counted, then extrapolated
