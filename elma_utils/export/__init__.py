"""Edge export: LiteRT parts, the edge bundle and the Keras-free edge runtime.

``litert_parts`` (export) needs TensorFlow/Keras and is imported on demand; ``bundle`` and
``edge_runtime`` need only NumPy and a LiteRT interpreter, so importing this package pulls
no TensorFlow.
"""

from elma_utils.export.bundle import (
    BUNDLE_FORMAT,
    FORMAT_VERSION,
    BundleError,
    check_thresholds,
    policy_from_thresholds,
    verify_bundle,
    write_bundle,
)
from elma_utils.export.edge_runtime import EdgeAnswer, EdgeModel, interpreter_class

__all__ = [
    "BUNDLE_FORMAT",
    "FORMAT_VERSION",
    "BundleError",
    "EdgeAnswer",
    "EdgeModel",
    "check_thresholds",
    "interpreter_class",
    "policy_from_thresholds",
    "verify_bundle",
    "write_bundle",
]
