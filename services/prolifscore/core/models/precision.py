"""Execution precision of the served models on CPU: fp32, or bf16 through TensorFlow's oneDNN
auto-mixed-precision graph rewrite.

bf16 is a serving-time choice, not an export format: the same fp32 SavedModel runs with
convolutions and matmuls in bfloat16 (AVX-512 BF16 or AMX) while precision-sensitive ops
(softmax, reductions, the uint8 preprocessing) stay fp32, and outputs stay float32. It is
TensorFlow Serving's `--mixed_precision=bfloat16` (tensorflow/serving PR #2193), which sets the
same Grappler option (`auto_mixed_precision_onednn_bfloat16`), so the local server and TF
Serving in Kubernetes run the same arithmetic. ONEDNN_DEFAULT_FPMATH_MODE=BF16 was measured too
and is not used: TensorFlow's own oneDNN kernels ignore it (no speedup with TF 2.21 here).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
# The Grappler option behind TF Serving's --mixed_precision=bfloat16.
BF16_OPTION = "auto_mixed_precision_onednn_bfloat16"
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); without it bf16 is
    emulated or the rewrite skipped, and fp32 is the better choice."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = {w for line in text.splitlines() if line.startswith("flags") for w in line.split()}
    return any(f in flags for f in _BF16_FLAGS)


def apply_precision(precision: str) -> bool:
    """Set this process's execution precision for every model loaded from now on (a process-wide
    TensorFlow option: call it before loading). Returns whether bf16 is in effect."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    import tensorflow as tf

    bf16 = precision == "bf16"
    tf.config.optimizer.set_experimental_options({BF16_OPTION: bf16})
    if bf16 and not cpu_has_bf16():
        log.warning(
            "bf16 asked for, but this CPU has neither AVX-512 BF16 nor AMX: no speedup to expect"
        )
        return False
    return bf16
