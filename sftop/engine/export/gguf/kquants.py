"""K-quants (Q4_K_M and friends) through llama.cpp's own `llama-quantize`, when it is installed.

The `gguf` package cannot produce K-quants, and sftop downloads and compiles nothing behind the
user's back: without `llama-quantize` on PATH the export stops before any work and says how to get it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from sftop.engine.errors import SftopError

K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
BINARY = "llama-quantize"


def find_quantizer(kind: str) -> str:
    path = shutil.which(BINARY)
    if path is None:
        raise SftopError(
            f"--gguf {kind} needs llama.cpp's `{BINARY}` program, which is not on PATH",
            hint=f"Install llama.cpp (e.g. `brew install llama.cpp`, or build it from source: "
            f"https://github.com/ggml-org/llama.cpp) so that `{BINARY}` is on PATH, or export "
            "--gguf q8_0 (or f16/bf16), which needs nothing else",
        )
    return path


def quantize(binary: str, source: Path, target: Path, kind: str) -> None:
    result = subprocess.run([binary, str(source), str(target), kind.upper()], capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise SftopError(
            f"`{BINARY}` failed ({result.returncode}) making {kind.upper()}: " + " / ".join(tail),
            where=str(source),
            hint=f"Run `{binary} {source} {target} {kind.upper()}` to see its full output",
        )
