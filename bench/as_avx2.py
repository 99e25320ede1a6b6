"""Run another benchmark as if this CPU had no fast bfloat16 products (AVX2 only), to measure that case on a machine
that has AVX512-BF16 or AMX.

    python bench/as_avx2.py bench/turn.py --json        # any script and its arguments

What it changes, before torch is imported: ATen's kernels are the AVX2 ones (``ATEN_CPU_CAPABILITY=avx2``), oneDNN
and MKL use AVX2 at most (``ONEDNN_MAX_CPU_ISA=AVX2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``), and `app.lm.base.fast_bf16`
answers False, so ``FSB_DTYPE=auto`` resolves as it would there (float32, with the bfloat16 decoder where it pays).
It is an emulation, not such a CPU: memory bandwidth, caches and clock stay this machine's, so read its figures as an
estimate for an AVX2-only CPU of the same class.
"""
from __future__ import annotations

import os
import runpy
import sys

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    wanted = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    if any(os.environ.get(k) != v for k, v in wanted.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})  # set before torch loads
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import app.lm.base
    import app.lm.hf
    import app.selector

    def no_fast_bf16(cpuinfo=None, cuda=None) -> bool:
        return bool(cuda)

    app.lm.base.fast_bf16 = app.lm.hf.fast_bf16 = app.selector.fast_bf16 = no_fast_bf16
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
