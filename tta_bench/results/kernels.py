"""What picks a cell's kernels (SPEC 7): the device class. Two runs of the same cell on the same
class compute with the same kernels and agree to rounding noise; across classes (another CPU
instruction set, thread count, BLAS or oneDNN build, faiss SIMD level; another GPU, CUDA or cuDNN
version, TF32 or reduced-precision setting) the kernels round differently, so the published
numbers reproduce only within a measured tolerance (`reproduction_tolerance`)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

# Environment variables that change which kernels run, recorded whenever they are set.
KERNEL_ENV = (
    "ATEN_CPU_CAPABILITY",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_CBWR",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "FAISS_OPT_LEVEL",
    "NVIDIA_TF32_OVERRIDE",
    "CUBLAS_WORKSPACE_CONFIG",
)

# Relative nll_sum tolerances of the reproduction check (README, "Reproducing the published numbers").
SAME_CLASS_TOLERANCE = 1e-9
# Another CPU class: the study's 22 cells on AVX-512 against AVX2 differed by 2.1e-6 to 4.0e-6
# relative (measured when the check was filed); torch's generic kernels (ATEN_CPU_CAPABILITY=default) against
# AVX2 by far less (the README gives the measured spread). 5x the largest.
CROSS_CPU_TOLERANCE = 2e-5
# A GPU against anything else: TF32 and reduced-precision reductions; benchmarks/gpu_smoke.py bounds the
# tiny model's GPU-CPU difference by 1e-3 relative.
CROSS_GPU_TOLERANCE = 1e-3


def _cpu_model() -> tuple[str, str]:
    """(model name, vendor) of the first processor in /proc/cpuinfo, else what platform knows."""
    import platform

    found = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            found.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return found.get("model name") or platform.processor() or platform.machine(), found.get("vendor_id", "")


def _torch_builds() -> dict:
    """The BLAS and oneDNN builds torch links, as torch.__config__ names them."""
    import torch

    shown = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", shown)
    mkl = re.search(r"Math Kernel Library Version ([\w.\-]+)", shown)
    onednn = re.search(r"(?:MKL-DNN|oneDNN) (v[\w.]+)", shown)
    return {
        "blas": (blas.group(1) if blas else "unknown") + (f" {mkl.group(1)}" if mkl else ""),
        "onednn": onednn.group(1) if onednn else None,
    }


def _faiss_level(requires: tuple) -> str | None:
    """faiss's SIMD level, where the cell's method uses faiss (it has imported it; the core never does)."""
    faiss = sys.modules.get("faiss")
    if faiss is None or not any(r.startswith("faiss") for r in requires):
        return None
    config = getattr(faiss, "SIMDConfig", None)
    if config is not None and hasattr(config, "get_level_name"):
        return str(config.get_level_name())
    options = faiss.get_compile_options().split() if hasattr(faiss, "get_compile_options") else []
    return next((o for o in options if o.startswith(("AVX", "SSE", "NEON", "SVE", "GENERIC"))), "unknown")


def kernel_info(device, requires: tuple = ()) -> dict:
    """What decides the kernels on `device` for a method needing the packages `requires`: the fields
    that make its class, plus the CPU's model name."""
    import torch

    env = {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {
            "kind": "cuda",
            "gpu": torch.cuda.get_device_name(device),
            "compute_capability": f"{major}.{minor}",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "fp16_reduced_precision": torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
            "bf16_reduced_precision": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
            "env": env,
        }
    name, vendor = _cpu_model()
    return {
        "kind": "cpu",
        "cpu": name,
        "vendor": vendor,
        "isa": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        **_torch_builds(),
        "faiss": _faiss_level(requires),
        "env": env,
    }


# The fields that decide the kernels; a CPU's model name (under a hypervisor often just "AMD EPYC")
# does not, its vendor may (MKL dispatches on it).
_CLASS_FIELDS = {
    "cpu": ("vendor", "isa", "threads", "blas", "onednn", "faiss", "env"),
    "cuda": (
        "gpu",
        "compute_capability",
        "cuda",
        "cudnn",
        "tf32_matmul",
        "tf32_cudnn",
        "float32_matmul_precision",
        "fp16_reduced_precision",
        "bf16_reduced_precision",
        "env",
    ),
}


def class_key(info: dict | None) -> tuple | None:
    """The device class: equal keys compute with the same kernels. None: not recorded."""
    if not info or info.get("kind") not in _CLASS_FIELDS:
        return None
    return (info["kind"],) + tuple(str(info.get(f)) for f in _CLASS_FIELDS[info["kind"]])


def device_line(info: dict) -> str:
    """The device as a leaderboard names it, its class in brackets: `CPU: AMD EPYC (AVX2), 2 threads`."""
    if info["kind"] == "cuda":
        tf32 = "TF32" if info["tf32_matmul"] else "no TF32"
        return f"GPU: {info['gpu']} (sm {info['compute_capability']}, CUDA {info['cuda']}, {tf32})"
    return f"CPU: {info['cpu']} ({info['isa']}), {info['threads']} threads"


def class_difference(theirs: dict, mine: dict) -> str:
    """What differs between two classes, e.g. `AVX2 there, AVX512 here`."""
    if theirs["kind"] != mine["kind"]:
        return f"{device_line(theirs)} there, {device_line(mine)} here"
    fields = _CLASS_FIELDS[mine["kind"]]
    parts = []
    for f in fields:
        a, b = theirs.get(f), mine.get(f)
        if str(a) != str(b):
            parts.append(f"{a} there, {b} here" if f in ("isa", "gpu") else f"{f} {a} there, {b} here")
    return "; ".join(parts) or "the same class"


def reproduction_tolerance(theirs: dict | None, mine: dict) -> tuple[float, str]:
    """(relative tolerance, the case) for comparing a published nll_sum made on `theirs` with one
    made here on `mine` (SPEC 7)."""
    if class_key(theirs) is None:
        tol = CROSS_GPU_TOLERANCE if mine["kind"] == "cuda" else CROSS_CPU_TOLERANCE
        return (
            tol,
            "the published cells record no device class (made before it was recorded), so the cross-class tolerance applies",
        )
    if class_key(theirs) == class_key(mine):
        return SAME_CLASS_TOLERANCE, f"made on the same device class ({device_line(mine)})"
    tol = CROSS_GPU_TOLERANCE if "cuda" in (theirs["kind"], mine["kind"]) else CROSS_CPU_TOLERANCE
    return tol, f"made with other kernels ({class_difference(theirs, mine)})"
