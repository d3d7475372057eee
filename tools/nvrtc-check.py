#!/usr/bin/env python3
"""Compile src/models/cuda_kernels.cu with NVIDIA's NVRTC, as the `cuda` build does at run time,
for every architecture cuda_kernels.rs names, and check that each kernel it loads is in the PTX.
No GPU needed: NVRTC is a library (PyPI's nvidia-cuda-nvrtc wheel; .ci/run fetches it).

    tools/nvrtc-check.py LIBDIR    # LIBDIR holds libnvrtc.so.13 and libnvrtc-builtins.so.13.*
"""
import ctypes
import os
import re
import sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
libdir = sys.argv[1]
# libnvrtc opens its builtins library by name, from the loader's path: load it first.
for name in sorted(os.listdir(libdir)):
    if re.fullmatch(r"libnvrtc-builtins\.so\.13\.\d+", name):
        ctypes.CDLL(os.path.join(libdir, name), mode=ctypes.RTLD_GLOBAL)
nvrtc = ctypes.CDLL(os.path.join(libdir, "libnvrtc.so.13"))
source = open(os.path.join(root, "src/models/cuda_kernels.cu"), "rb").read()
rust = open(os.path.join(root, "src/models/cuda_kernels.rs")).read()
arches = sorted(set(re.findall(r'"(compute_\d+)"', rust)))
kernels = {f"{name}_{dtype}" for name in re.findall(r'func\("(\w+)"\)', rust) for dtype in ("f32", "bf16")}
# The attention kernels, bf16 only, one per padded head dimension: the forward's for each of
# FLASH_HEAD_DIMS, the backward's two for each of FLASH_BACKWARD_HEAD_DIMS.
def head_dims(name):
    found = re.search(name + r": \[usize; \d+\] = \[([\d, ]+)\]", rust)
    assert found, f"no {name} in cuda_kernels.rs"
    return [d.strip() for d in found.group(1).split(",")]
kernels |= {f"flash_attention_d{d}_bf16" for d in head_dims("FLASH_HEAD_DIMS")}
kernels |= {f"flash_attention_grad_{part}_d{d}_bf16" for d in head_dims("FLASH_BACKWARD_HEAD_DIMS") for part in ("q", "kv")}
assert arches and kernels, "no architectures or kernels found in cuda_kernels.rs"

failed = False
for arch in arches:
    prog = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source, b"layerdiff_fused.cu", 0, None, None) == 0
    opts = [f"--gpu-architecture={arch}".encode()]
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    log = log.value.decode().strip()
    entries = set()
    if rc == 0:
        nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetPTX(prog, ptx)
        entries = set(re.findall(r"^\.visible \.entry (\w+)\(", ptx.value.decode(), re.M))
    missing = sorted(kernels - entries)
    ok = rc == 0 and not log and not missing
    failed |= not ok
    print(f"{arch}: {'ok' if ok else 'FAILED'} ({len(entries)} kernels){' missing ' + ', '.join(missing) if missing else ''}")
    if log:
        print(log)
sys.exit(1 if failed else 0)
