"""The one module that imports llama_cpp.

For now it offers llama.cpp's quantizer to the bundle builder; the serving engine grows
here (continuous batching on the low-level API) without another module touching llama_cpp.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import llama_cpp

from appliance.errors import ApplianceError


def quantize_gguf(source: Path, target: Path, quant_type: str) -> None:
    """Quantize an F32/F16/BF16 GGUF to `quant_type` (e.g. "Q4_K_M") with llama.cpp."""
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant_type}", None)
    if ftype is None:
        raise ApplianceError(f"llama.cpp does not know the quantization type {quant_type}")
    # llama-cpp-python prints llama.cpp's log through this logger; keep only errors.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(
        str(source).encode(), str(target).encode(), ctypes.byref(params)
    )
    if status != 0 or not target.is_file():
        raise ApplianceError(f"llama.cpp failed to quantize {source.name} to {quant_type}")
