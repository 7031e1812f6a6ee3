"""Which device sent an ask: the device's SSH key signs it, the server checks the signature.

A request's ``device_id`` is only a claim. The store files questions under it, retries are
recognised by (device_id, request id), and the growth loop trusts what it learns from them,
so one device must not be able to write under another's name. Each device already holds
an ed25519 key, registered in the server's ``authorized_keys`` with its device id as the
line's comment (``elma keys add``); the device signs every ask with that key
(:func:`sign_request`) and the server accepts an ask only when its signature verifies
against a key registered for the claimed ``device_id`` (:class:`DeviceRegistry`).

Why a signature and not "the key the SSH connection authenticated with": on the OpenSSH
route sshd only forwards bytes to the model service, which never learns which key logged
in. A signature works the same on both routes, and because the registry re-reads
``authorized_keys`` when it changes, removing a device's line stops its asks at once, even
on a connection that was opened before.

What is signed: a domain tag and the request's content in canonical JSON — id, device id,
question, the context's sha256 (so the full-text and by-reference forms of one request
share one signature) and the edge's answer. ``deadline_ms`` is not content and is not
signed.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from dataclasses import asdict, replace
from pathlib import Path

import paramiko

from elma_utils.edge.protocol import AskRequest, ProtocolError, is_identifier
from elma_utils.edge.ssh_keys import AuthorizedKey, fingerprint, read_authorized_keys

log = logging.getLogger(__name__)

SIGNATURE_DOMAIN = b"elma-ask-signature-v1\n"


def _edge_content(request: AskRequest) -> dict:
    """The edge result as signed: ``asked`` only when set, so that a request without it signs
    the same bytes as before the field existed (older devices stay valid; a device that sends
    it needs a server that knows it: upgrade the server first)."""
    edge = asdict(request.edge)
    if edge.get("asked") is None:
        edge.pop("asked", None)
    return edge


def signed_content(request: AskRequest) -> bytes:
    """The bytes a device signs for ``request`` (identical on both ends)."""
    content = {
        "id": request.id,
        "device_id": request.device_id,
        "question": request.question,
        "context_sha256": request.ref,
        "edge": _edge_content(request),
    }
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return SIGNATURE_DOMAIN + text.encode("utf-8")


def sign_request(request: AskRequest, key: paramiko.PKey) -> AskRequest:
    """``request`` with ``sig`` set: the device key's signature of its content."""
    message = key.sign_ssh_data(signed_content(request))
    return replace(request, sig=base64.b64encode(message.asbytes()).decode("ascii"))


def signature_valid(request: AskRequest, key: paramiko.PKey) -> bool:
    """Whether ``request.sig`` is ``key``'s signature of the request's content."""
    if request.sig is None:
        return False
    try:
        message = paramiko.Message(base64.b64decode(request.sig, validate=True))
        return bool(key.verify_ssh_sig(signed_content(request), message))
    except Exception:  # malformed signature bytes: simply not a valid signature
        return False


class DeviceRegistry:
    """Device ids and their keys, read from an ``authorized_keys`` file (comment = device id).

    The file is re-read whenever its size, mtime or inode changes, so ``elma keys add`` and
    ``elma keys revoke`` take effect for the very next request. Lines whose comment is not a
    valid device id (1-64 of ``A-Z a-z 0-9 . _ : -``) register no device.
    """

    def __init__(self, authorized_keys_path: str | os.PathLike):
        self.path = Path(authorized_keys_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"authorized_keys {self.path} not found (make it with `elma keys add`)")
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._by_device: dict[str, list[paramiko.PKey]] = {}

    def _entries(self) -> dict[str, list[paramiko.PKey]]:
        try:
            st = self.path.stat()
        except OSError as exc:
            log.error("device registry: cannot read %s: %s", self.path, exc)
            return {}
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if stamp != self._stamp:
                self._by_device = _by_device(read_authorized_keys(self.path))
                self._stamp = stamp
            return self._by_device

    def devices(self) -> dict[str, list[str]]:
        """Registered device ids → fingerprints of their keys."""
        return {d: [fingerprint(k) for k in keys] for d, keys in sorted(self._entries().items())}

    def verify(self, request: AskRequest) -> None:
        """Raise ``ProtocolError("forbidden")`` unless a key of ``request.device_id`` signed it."""
        keys = self._entries().get(request.device_id)
        if not keys:
            raise ProtocolError(
                "forbidden", f"device {request.device_id!r} is not registered on this server", request.id
            )
        if request.sig is None:
            raise ProtocolError("forbidden", "the ask is not signed by the device's key", request.id)
        if not any(signature_valid(request, key) for key in keys):
            raise ProtocolError(
                "forbidden", f"the signature does not match device {request.device_id!r}'s key", request.id
            )


def _by_device(entries: list[AuthorizedKey]) -> dict[str, list[paramiko.PKey]]:
    found: dict[str, list[paramiko.PKey]] = {}
    for entry in entries:
        if is_identifier(entry.comment):
            found.setdefault(entry.comment, []).append(entry.key)
    return found
