"""Quiet start-up: keep TensorFlow/absl/CUDA/oneDNN/LiteRT start-up chatter off the terminal.

Two parts, both standard library only:

- :func:`quiet_environment` sets (unless already set) the environment variables the native
  libraries read when they load: ``TF_CPP_MIN_LOG_LEVEL=3`` (TensorFlow's C++ log) and
  ``GRPC_VERBOSITY=ERROR``. The ``elma`` command calls it before anything imports TensorFlow.
  It never hides GPUs (``CUDA_VISIBLE_DEVICES`` is left alone, ``elma train`` wants them) and
  does not turn oneDNN off (``TF_ENABLE_ONEDNN_OPTS=0`` changes the numbers).
- Some lines ignore every variable: TensorFlow 2.21 writes "All log messages before
  absl::InitializeLog() ...", ``cudart_stub.cc`` "Could not find cuda drivers", the oneDNN
  notice and ``failed call to cuInit`` through absl before its own log level is read, and
  LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.".
  :func:`native_noise_filtered` points file descriptor 2 at a temporary file for a block
  (importing and loading a model, answering), then writes back every line that is not such
  noise; everything else (Python warnings, tracebacks, real errors) comes through, in order,
  when the block ends. ``ELMA_NATIVE_LOGS=1`` turns the filter off.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator, MutableMapping

QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR"}
SHOW_ALL_ENV = "ELMA_NATIVE_LOGS"

NOISE = re.compile(
    r"^(?:"
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:.]+\s+\d+ [\w./-]+:\d+\] "  # absl/glog INFO and WARNING lines
    r"|E\d{4} [\d:.]+\s+\d+ [\w./-]+:\d+\] .*(?:cuInit|CUDA|cuda|cuDNN|cuFFT|cuBLAS|TensorRT)"  # no GPU here
    r"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."
    r"|INFO: Initialized TensorFlow Lite runtime\."
    r"|WARNING:absl:"
    r")"
)


def quiet_environment(environ: MutableMapping[str, str] | None = None) -> None:
    """Set the native libraries' log variables in `environ` (default ``os.environ``), only
    those not set already."""
    environ = os.environ if environ is None else environ
    for name, value in QUIET_ENV.items():
        environ.setdefault(name, value)


def is_noise(line: str) -> bool:
    return NOISE.match(line) is not None


@contextlib.contextmanager
def native_noise_filtered() -> Iterator[None]:
    """Hold back what is written to file descriptor 2 in the block; write back all but noise.

    A no-op when ``ELMA_NATIVE_LOGS=1`` or when fd 2 cannot be redirected.
    """
    if os.environ.get(SHOW_ALL_ENV) == "1":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode("utf-8", "replace")
            kept = "".join(line for line in text.splitlines(keepends=True) if not is_noise(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()
