"""Edge export: LiteRT parts and the edge bundle, written on the training machine.

``litert_parts`` (export) needs TensorFlow/Keras and is imported on demand; ``bundle`` needs
only the standard library, so the device (``elma_utils.edge``) can verify bundles with it.
The Keras-free runtime that answers with a bundle is ``elma_utils.edge.runtime``.
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

__all__ = [
    "BUNDLE_FORMAT",
    "FORMAT_VERSION",
    "BundleError",
    "check_thresholds",
    "policy_from_thresholds",
    "verify_bundle",
    "write_bundle",
]
