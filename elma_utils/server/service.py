"""`elma serve`: the full model answering offloaded questions for many edge devices at once.

    server = OffloadServer(ModelAnswerer.load("artifacts/minilm-cpu"), "server/hard.sqlite3")
    server.start()                       # 127.0.0.1:<port>, or unix_socket="/path/elma.sock"
    ...
    server.close()

Layers, each replaceable:
- ``ModelAnswerer``: the QA model, loaded once; answers a *batch* of (question, context).
- ``MicroBatcher`` (``batcher.py``): one worker thread owns the model and answers the
  waiting requests in batches.
- ``OffloadService``: one message in, one reply out. An ``ask`` is answered, **stored**
  (``HardQuestionStore``, WAL, synchronous) and only then acknowledged, so a reply the edge
  received is never lost, even when the server is killed right after. Malformed, oversized,
  unknown-version and unknown-context messages get an ``error`` reply; nothing a client
  sends takes the server down.
- ``OffloadServer``: a threaded socket server bound to loopback only (TCP or a Unix socket);
  the encrypted ways in are SSH: OpenSSH's port forwarding, or ``SSHEndpoint`` (started by
  ``elma serve --listen HOST:PORT``) forwarding to this socket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import math
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from elma_utils.edge.identity import DeviceRegistry
from elma_utils.edge.protocol import (
    MAX_MESSAGE_BYTES,
    AnswerReply,
    AskRequest,
    ErrorReply,
    Hello,
    LineReader,
    Message,
    Ping,
    Pong,
    ProtocolError,
    decode,
    encode,
    error_reply_for,
)
from elma_utils.server.batcher import MicroBatcher, Overloaded, ServerAnswer
from elma_utils.server.store import HardQuestionStore

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "::1", "localhost")
MAX_CONTEXT_CHARS = 50_000  # ≈ 12 windows of 384 tokens: about a second of the CPU model
MAX_SERVER_DEADLINE_MS = 60_000  # longer deadlines are cut to this
DEFAULT_SERVICE_PORT = 7433  # the address devices forward to when the service is a Unix socket
LISTEN_BACKLOG = 256  # socketserver's default of 5 dropped asks when 200 devices came at once


class ModelAnswerer:
    """A fine-tuned QA artifact (``QAModel``) answering batches; ``model_version`` names it."""

    def __init__(self, qa_model, model_version: str):
        self.qa = qa_model
        self.model_version = model_version

    @classmethod
    def load(cls, model_dir: str | Path, null_threshold: float | None = None) -> ModelAnswerer:
        from elma_utils.model.inference import QAModel

        model_dir = Path(model_dir)
        qa = QAModel.load(model_dir, null_threshold=null_threshold)
        version = str(qa.config.get("model_version") or f"{model_dir.name}")
        return cls(qa, version)

    def answer_batch(self, pairs: Sequence[tuple[str, str]]) -> list[ServerAnswer]:
        return [_server_answer(a) for a in self.qa.predict(list(pairs))]


def _server_answer(a) -> ServerAnswer:
    """A model answer as it may go on the wire.

    A score that is not a finite number (-inf when a context holds nothing the tokenizer
    keeps: only zero-width spaces, NUL, soft hyphens, a BOM; NaN) means the model found no
    span it can stand behind: that is a no-answer reply, never a protocol error that the
    device would have to resend for ever.
    """
    score = float(a.score)
    no_answer = bool(a.no_answer) or not math.isfinite(score) or a.char_start < 0
    return ServerAnswer(
        text="" if no_answer else a.text,
        start=None if no_answer else int(a.char_start),
        end=None if no_answer else int(a.char_end),
        score=score if math.isfinite(score) else 0.0,
        no_answer=no_answer,
    )


class OffloadService:
    """Protocol messages in, replies out; asks are answered, stored, then acknowledged."""

    def __init__(
        self,
        answerer: ModelAnswerer,
        store: HardQuestionStore,
        *,
        name: str = "elma-server",
        max_batch: int = 16,
        max_wait_ms: float = 2.0,
        default_deadline_ms: int = 30_000,
        max_deadline_ms: int = MAX_SERVER_DEADLINE_MS,
        max_context_chars: int = MAX_CONTEXT_CHARS,
        registry: DeviceRegistry | None = None,
    ):
        """``registry``: when set, every ask must be signed by a key registered for its
        ``device_id`` (a server reachable over SSH always has one); None trusts the claim
        (a model service used on this machine only, e.g. by tests and notebooks)."""
        self.answerer = answerer
        self.store = store
        self.name = name
        self.max_deadline_ms = int(max_deadline_ms)
        self.default_deadline_ms = min(int(default_deadline_ms), self.max_deadline_ms)
        self.max_context_chars = int(max_context_chars)
        self.registry = registry
        self.batcher = MicroBatcher(answerer.answer_batch, max_batch, max_wait_ms)
        self.on_stored: Callable[[], None] | None = None  # called after each newly stored ask (growth loop)
        self._busy = threading.Condition()
        self._in_flight = 0
        self._draining = False

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """Count one request, from its arrival until its reply is sent (``drain`` waits for these)."""
        with self._busy:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._busy:
                self._in_flight -= 1
                self._busy.notify_all()

    def drain(self, timeout: float) -> int:
        """Refuse new asks (``overloaded``: the device keeps them and asks again later) and wait up
        to ``timeout`` seconds for the requests in flight; returns how many were still running."""
        deadline = time.monotonic() + timeout
        with self._busy:
            self._draining = True
            while self._in_flight and (left := deadline - time.monotonic()) > 0:
                self._busy.wait(left)
            return self._in_flight

    def busy(self) -> int:
        """Requests received and not yet answered."""
        with self._busy:
            return self._in_flight

    def handle_line(self, line: bytes) -> bytes:
        """One received line → the encoded reply line (never raises for bad input)."""
        t0 = time.perf_counter()
        try:
            msg = decode(line)
        except ProtocolError as err:
            log.warning("refused a message: %s", err)
            return encode(error_reply_for(err))
        try:
            return encode(self.handle(msg))
        except ProtocolError as err:  # the client's mistake (or overload): one line, no traceback
            _log_refusal(msg, err, t0)
            return encode(error_reply_for(err, getattr(msg, "id", None)))
        except Exception as exc:
            log.exception("request %s failed", getattr(msg, "id", None))
            return encode(error_reply_for(exc, getattr(msg, "id", None)))

    def handle(self, msg: Message) -> Message:
        if isinstance(msg, AskRequest):
            return self.ask(msg)
        if isinstance(msg, Ping):
            return Pong(msg.id)
        if isinstance(msg, Hello):
            return Hello(msg.id, self.name, self.answerer.model_version, MAX_MESSAGE_BYTES)
        raise ProtocolError("bad_request", f"a server does not accept {type(msg).TYPE!r} messages", msg.id)

    def ask(self, req: AskRequest) -> AnswerReply | ErrorReply:
        t0 = time.perf_counter()
        log.debug("ask device=%s id=%s received", req.device_id, req.id)
        if self._draining:
            raise ProtocolError("overloaded", "the server is shutting down; ask again later", req.id)
        if self.registry is not None:
            self.registry.verify(req)
        if req.context is not None and len(req.context) > self.max_context_chars:
            raise ProtocolError(
                "too_large",
                f"the context is {len(req.context)} characters; this server answers about at most"
                f" {self.max_context_chars} (elma serve --max-context-chars); send the passage around"
                " the question instead of the whole text",
                req.id,
            )
        context = req.context if req.context is not None else self.store.get_context(req.ref)
        if context is None:
            raise ProtocolError(
                "unknown_context", f"the server holds no context {req.ref}; send the text", req.id
            )
        if req.edge.end is not None and req.edge.end > len(context):
            raise ProtocolError("bad_request", "edge.end is past the end of the context", req.id)
        # A device may not hold a worker (and its own slot in the queue) longer than the cap.
        deadline_ms = min(req.deadline_ms or self.default_deadline_ms, self.max_deadline_ms)
        deadline = time.monotonic() + deadline_ms / 1000
        try:
            ans = self.batcher.submit(req.question, context, deadline, device_id=req.device_id).result(
                timeout=deadline_ms / 1000
            )
        except (Overloaded, TimeoutError) as err:
            raise ProtocolError("overloaded", f"not answered within {deadline_ms} ms: {err}", req.id) from err
        reply = AnswerReply(
            id=req.id,
            text=ans.text,
            score=ans.score,
            no_answer=ans.no_answer,
            model_version=self.answerer.model_version,
            server_ms=(time.perf_counter() - t0) * 1000,
            start=ans.start,
            end=ans.end,
        )
        stored_req = req if req.context is not None else _with_context(req, context)
        stored = self.store.record(stored_req, reply)  # durable before the edge hears of it
        log.info(
            "ask device=%s id=%s source=server %s %.1f ms",
            req.device_id,
            req.id,
            "retry" if stored.duplicate else "stored",
            (time.perf_counter() - t0) * 1000,
        )
        if not stored.duplicate and self.on_stored is not None:
            self.on_stored()
        return reply

    def close(self) -> None:
        self.batcher.close()


def _log_refusal(msg: Message, err: ProtocolError, t0: float) -> None:
    ms = (time.perf_counter() - t0) * 1000
    if isinstance(msg, AskRequest):
        log.warning(
            "ask device=%s id=%s source=server refused %s: %s %.1f ms",
            msg.device_id, msg.id, err.code, err.message, ms,
        )  # fmt: skip
    else:
        log.warning("refused %s %s: %s", type(msg).TYPE, getattr(msg, "id", None), err)


def _with_context(req: AskRequest, context: str) -> AskRequest:
    return dataclasses.replace(req, context=context, context_ref=None)


class _Handler(socketserver.BaseRequestHandler):
    """One connection: read lines, answer each in order, until the peer closes."""

    def handle(self) -> None:
        service: OffloadService = self.server.service  # type: ignore[attr-defined]
        sock: socket.socket = self.request
        reader = LineReader(MAX_MESSAGE_BYTES)
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                return
            if not chunk:
                for err in reader.finish():
                    with contextlib.suppress(OSError):
                        sock.sendall(encode(error_reply_for(err)))
                return
            for item in reader.feed(chunk):
                with service.in_flight():  # until the reply is written: a draining server waits for it
                    reply = (
                        encode(error_reply_for(item))
                        if isinstance(item, ProtocolError)
                        else service.handle_line(item)
                    )
                    try:
                        sock.sendall(reply)
                    except OSError:
                        return


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG


class OffloadServer:
    """The service on a loopback TCP port (``port=0``: any free one) or a Unix socket."""

    def __init__(
        self,
        answerer: ModelAnswerer,
        store_path: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        unix_socket: str | Path | None = None,
        **service_options,
    ):
        if unix_socket is None and host not in LOOPBACK:
            raise ValueError(
                f"the offload service listens on loopback only (got host {host!r}); "
                "remote devices come in over SSH (OpenSSH port forwarding or `elma serve --listen HOST:PORT`)"
            )
        self.store = HardQuestionStore(store_path)
        self.service = OffloadService(answerer, self.store, **service_options)
        if unix_socket is not None:
            path = Path(unix_socket)
            if len(os.fsencode(path)) > 107:  # sun_path holds 108 bytes, the final NUL included
                raise ValueError(
                    f"Unix socket path {path} is too long for the kernel (max 107 bytes); choose a shorter --unix"
                )
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            old_umask = os.umask(0o177)  # created 0600: no moment in which another user could connect
            try:
                self._server: socketserver.BaseServer = _UnixServer(str(path), _Handler)
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)  # only this user may talk to it
        else:
            self._server = _TCPServer((host, port), _Handler)
        self._server.service = self.service  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None
        self._serving = False

    @property
    def address(self):
        return self._server.server_address

    @property
    def port(self) -> int | None:
        addr = self.address
        return int(addr[1]) if isinstance(addr, tuple) else None

    def start(self) -> OffloadServer:
        self._serving = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="elma-serve", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._serving = True
        self._server.serve_forever()

    def stop_accepting(self) -> None:
        """Close the listening socket (and remove a Unix socket's path); open connections go on."""
        if self._serving:
            self._server.shutdown()  # serve_forever returns; handler threads keep running
            self._serving = False
        self._server.server_close()
        if isinstance(self.address, str):
            with contextlib.suppress(FileNotFoundError):
                Path(self.address).unlink()

    def close(self) -> None:
        self.stop_accepting()
        self.service.close()
        self.store.close()

    def __enter__(self) -> OffloadServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port): an IPv4 address, or an IPv6 one in brackets (``[::]:2222``).

    Raises ValueError with one line saying what a good address looks like."""
    example = "e.g. 0.0.0.0:2222, [::]:2222 or 10.0.0.1:2222"
    host, sep, port_text = str(text).strip().rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"--listen {text!r}: give HOST:PORT with a port 0-65535 ({example})")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            addr = None
        if addr is None or addr.version != 6:
            raise ValueError(f"--listen {text!r}: {host!r} in brackets is not an IPv6 address ({example})")
    else:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"--listen {text!r}: {host!r} is not an IP address ({example})") from None
        if addr.version == 6:
            raise ValueError(
                f"--listen {text!r}: write an IPv6 address in brackets, e.g. [{host}]:{port_text}"
            )
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_can_listen(host: str, port: int) -> None:
    """Bind (and release) ``host:port`` now, so a wrong address fails before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ValueError(
                f"cannot listen on {format_address(host, port)}: {exc.strerror or exc}"
            ) from None


LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str | int = "info") -> None:
    """Timestamped log lines on stderr (one per ask: ``ask device=... id=... source=server ... ms``).

    Paramiko's own per-connection chatter stays out unless ``level`` is debug."""
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else int(level)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_elma", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%dT%H:%M:%S"))
    handler._elma = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.getLogger("paramiko").setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)


DRAIN_SECONDS = 10.0


def serve(
    model_dir: str | Path,
    store_path: str | Path | None = None,
    *,
    server_root: str | Path | None = None,
    listen: str | tuple[str, int] | None = None,
    port: int | None = None,
    unix_socket: str | Path | None = None,
    ssh_port: int | None = None,
    service_port: int = DEFAULT_SERVICE_PORT,
    authorized_keys: str | Path | None = None,
    host_key: str | Path | None = None,
    sftp_root: str | Path | None = None,
    null_threshold: float | None = None,
    max_batch: int = 16,
    max_context_chars: int = MAX_CONTEXT_CHARS,
    max_deadline_ms: int = MAX_SERVER_DEADLINE_MS,
    drain_s: float = DRAIN_SECONDS,
    growth=None,
    ready: Callable[[str], None] = print,
    stop: threading.Event | None = None,
) -> None:
    """Load the model once, listen on loopback (and ELMA's SSH endpoint), serve until ``stop``
    is set or SIGTERM/SIGINT, then stop cleanly. ``ready`` gets one line per listening address.

    ``listen``: the SSH endpoint's address, ``"HOST:PORT"`` (``"[::]:2222"``: IPv6 and IPv4) or a
    tuple; ``ssh_port=N`` is short for ``127.0.0.1:N``. The model service itself never leaves
    loopback: behind the endpoint it listens on a Unix socket (mode 0600, beside the store)
    unless ``port`` or ``unix_socket`` says otherwise; devices still name a TCP address in
    their forwards, ``127.0.0.1:service_port``, which the endpoint connects to the socket.

    ``server_root`` (``status.ServerLayout``) gives the defaults: the store, authorized_keys,
    the host key and the bundles as the SFTP root; explicit arguments win. With
    ``authorized_keys`` every ask must be signed by the key registered for its device id.

    ``growth``: ``growth.GrowthSettings``; runs the growth loop beside the server (needs
    ``server_root``).

    Stopping (SIGTERM): no new connections, new asks are refused as ``overloaded`` (devices keep
    them and ask again), the asks in flight are answered and stored (up to ``drain_s``), a
    growth step is interrupted, then the endpoint, the service, the batcher and the store close.

    Every address and file is checked before the model loads; mistakes raise ValueError or
    FileNotFoundError with one line."""
    import signal

    from elma_utils.server.status import ServerLayout

    layout = ServerLayout(Path(server_root)) if server_root is not None else None
    if layout is not None:
        layout.root.mkdir(parents=True, exist_ok=True)
    if listen is not None and ssh_port is not None:
        raise ValueError("give the SSH endpoint's address once: --listen HOST:PORT or --ssh-port N")
    if ssh_port is not None:
        listen = ("127.0.0.1", int(ssh_port))
    if isinstance(listen, str):
        listen = parse_listen(listen)
    if listen is not None:
        check_can_listen(*listen)
    if port:
        check_can_listen("127.0.0.1", port)
    if store_path is None:
        store_path = layout.store if layout is not None else Path("server/hard-questions.sqlite3")
    if layout is not None:
        if authorized_keys is None and (listen is not None or layout.authorized_keys.is_file()):
            authorized_keys = layout.authorized_keys
        host_key = host_key if host_key is not None else layout.host_key
        if sftp_root is None and listen is not None:
            sftp_root = layout.bundles
            Path(sftp_root).mkdir(parents=True, exist_ok=True)
    if listen is not None and (authorized_keys is None or host_key is None):
        raise ValueError(
            "the SSH endpoint (--listen) needs --authorized-keys FILE and --host-key FILE (or --server-root DIR)"
        )
    if listen is not None and not Path(authorized_keys).is_file():
        raise FileNotFoundError(
            f"authorized_keys {authorized_keys} not found: register a device first "
            f"(elma keys add --authorized-keys {authorized_keys} --device ID --public-key FILE.pub)"
        )
    if port is not None and unix_socket is not None:
        raise ValueError("listen on a TCP --port or a --unix socket, not both")
    if growth is not None and layout is None:
        raise ValueError("the growth loop (--grow-after / --grow-every) needs --server-root DIR")
    if listen is not None and port is None and unix_socket is None:
        unix_socket = Path(store_path).resolve().parent / "elma-service.sock"
        Path(unix_socket).parent.mkdir(parents=True, exist_ok=True)
    registry = DeviceRegistry(authorized_keys) if authorized_keys is not None else None  # checks the file
    if growth is not None:
        growth.full_model = growth.full_model or Path(model_dir)
        growth.check()
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"--model {model_dir}: no such model directory")
    stop = stop or threading.Event()
    from elma_utils.native_logs import native_noise_filtered

    with native_noise_filtered():  # TensorFlow's start-up chatter (elma_utils.native_logs)
        answerer = ModelAnswerer.load(model_dir, null_threshold)
    server = OffloadServer(
        answerer,
        store_path,
        port=port or 0,
        unix_socket=unix_socket,
        max_batch=max_batch,
        max_context_chars=max_context_chars,
        max_deadline_ms=max_deadline_ms,
        registry=registry,
    )
    server.start()
    endpoint = supervisor = None
    try:
        where = server.address if unix_socket is not None else f"127.0.0.1:{server.port}"
        ready(f"elma serve: model {answerer.model_version} listening on {where}")
        if registry is None:
            ready("elma serve: no --authorized-keys: device ids are taken on trust (local use only)")
        else:
            ready(f"elma serve: asks must be signed by one of {len(registry.devices())} registered devices")
        if listen is not None:
            from elma_utils.edge.ssh_keys import fingerprint, generate_ed25519_key, load_private_key
            from elma_utils.server.ssh_endpoint import SSHEndpoint

            if not Path(host_key).is_file():
                generate_ed25519_key(Path(host_key), comment="elma-serve host key")
            target = server.address if unix_socket is not None else ("127.0.0.1", server.port)
            endpoint = SSHEndpoint(
                host_key,
                authorized_keys,
                target,
                host=listen[0],
                port=listen[1],
                sftp_root=sftp_root,
                advertised_port=service_port if unix_socket is not None else None,
            ).start()
            ready(
                f"elma serve: SSH endpoint on {format_address(listen[0], endpoint.port)} "
                f"(host key {fingerprint(load_private_key(Path(host_key)))}); "
                f"devices forward to {endpoint.advertised[0]}:{endpoint.advertised[1]}"
            )
        if growth is not None:
            from elma_utils.server.growth import GrowthSupervisor

            supervisor = GrowthSupervisor(layout.root, store_path, growth).start()
            server.service.on_stored = supervisor.notify_stored
            ready(
                f"elma serve: growth loop on ({supervisor.new_questions()} new stored questions; "
                f"state {layout.growth_state})"
            )
        received: list[str] = []

        def on_signal(signum: int, _frame) -> None:
            received.append(signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (tests): rely on `stop`
                signal.signal(sig, on_signal)
        while not stop.wait(0.5):
            pass
        busy = server.service.busy()
        log.info(
            "elma serve: %s: stopping; waiting up to %g s for %d request(s) in flight",
            received[0] if received else "stop requested", drain_s, busy,
        )  # fmt: skip
        if endpoint is not None:
            endpoint.stop_accepting()
        server.stop_accepting()
        if supervisor is not None:
            supervisor.request_stop()
        left = server.service.drain(drain_s)
        if left:
            log.warning("elma serve: %d request(s) still running after %g s; closing anyway", left, drain_s)
    finally:
        if supervisor is not None:
            supervisor.stop()
        if endpoint is not None:
            endpoint.close()
        server.close()
    log.info("elma serve: stopped")
