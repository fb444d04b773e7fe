"""A TLS / SASL gateway in front of the embedded Kafka broker, which can do neither here.

Tansu 0.6 as bundled cannot serve TLS (`--cert` with `--key` is refused by its CLI, `--cert`
alone still listens in plaintext) and its SASL needs users that memory storage cannot hold. So the
broker listens in plaintext on a loopback port and advertises this gateway's address; every
client connection goes through the gateway, which

1. terminates TLS (optionally requiring a client certificate signed by a CA: mTLS),
2. authenticates SASL PLAIN / SCRAM-SHA-256 / SCRAM-SHA-512 by reading Kafka request frames
   until authentication succeeds: ApiVersions goes to the broker and back, SaslHandshake (v0, v1)
   and SaslAuthenticate (v0-v2) are answered here, any other request closes the connection
   (as Kafka does), a failed authentication answers SASL_AUTHENTICATION_FAILED and closes,
3. then relays bytes both ways untouched.

secure_broker.py starts the broker and its gateway together (and is the command line).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from prolifscore.localstack.broker import HOST
from prolifscore.localstack.kafka_frames import (
    API_VERSIONS,
    AUTHENTICATE_MAX_VERSION,
    HANDSHAKE_MAX_VERSION,
    MAX_PREAUTH_FRAME,
    SASL_AUTHENTICATE,
    SASL_AUTHENTICATION_FAILED,
    SASL_HANDSHAKE,
    UNSUPPORTED_SASL_MECHANISM,
    MalformedFrame,
    Request,
    authenticate_response,
    authenticate_token,
    handshake_mechanism,
    handshake_response,
    parse_request,
    read_frame,
    write_frame,
)
from prolifscore.localstack.kafka_sasl import (
    MECHANISMS,
    SaslFailure,
    SaslServer,
    UserStore,
    new_server,
)

log = logging.getLogger(__name__)
FAILED_AUTH_DELAY_S = 0.1


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """Server certificate and key; with `client_ca_file`, clients must present a certificate
    signed by that CA (mutual TLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=self.client_ca_file)
        return ctx


class _Client:
    """One client connection and, once needed, its connection to the broker."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        self.reader, self.writer, self.peer = reader, writer, peer
        self.identity = ""  # TLS client certificate subject, if any
        self.user: str | None = None  # SASL user, once authenticated
        self.up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def send(self, payload: bytes) -> None:
        write_frame(self.writer, payload)
        await self.writer.drain()

    def close(self) -> None:
        for writer in (self.writer, self.up[1] if self.up else None):
            if writer is not None:
                writer.close()


class KafkaGateway:
    """TLS and/or SASL in front of a plaintext Kafka broker, served by an asyncio loop thread.

    `upstream()` gives the broker's (host, port) when a client needs it, so the broker can be
    started (or moved to another port) after the gateway. `stats` counts connections,
    tls_failures, auth_failures, authenticated and rejected (requests before authentication).
    """

    def __init__(
        self,
        upstream: Callable[[], tuple[str, int]],
        *,
        tls: TlsConfig | None = None,
        users: Mapping[str, str] | UserStore | None = None,
        mechanisms: Sequence[str] = MECHANISMS,
        port: int = 0,
        auth_timeout_s: float = 30.0,
    ) -> None:
        unknown = set(mechanisms) - set(MECHANISMS)
        if unknown or not mechanisms:
            raise ValueError(f"SASL mechanisms must be among {', '.join(MECHANISMS)}: {unknown}")
        self._upstream = upstream
        self.tls = tls
        self._ssl = tls.server_context() if tls else None
        self.users = users if isinstance(users, UserStore) or users is None else UserStore(users)
        self.mechanisms = tuple(mechanisms)
        self.port = port
        self.auth_timeout_s = auth_timeout_s
        self.stats: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._clients: set[_Client] = set()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> KafkaGateway:
        """Listen on 127.0.0.1 (port 0: the OS picks one, known when this returns)."""
        if self._thread is not None:
            return self
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="kafka-gateway", daemon=True
        )
        self._thread.start()
        try:
            ready.result(timeout=10)
        except BaseException:
            self._thread.join(timeout=10)
            self._thread = None
            raise
        sasl = ",".join(self.mechanisms) if self.users else None
        mtls = self.tls is not None and self.tls.client_ca_file is not None
        log.info(
            "kafka gateway listening",
            extra={"address": self.address, "tls": bool(self.tls), "mtls": mtls, "sasl": sasl},
        )
        return self

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main(ready))
        finally:
            self._loop.close()

    async def _main(self, ready: concurrent.futures.Future[None]) -> None:
        """Serve until stop(), then close the listener and every connection, and wait for them."""
        self._stopping = asyncio.Event()
        try:
            server = await asyncio.start_server(self._serve, HOST, self.port)
        except OSError as exc:
            ready.set_exception(exc)
            return
        self.port = server.sockets[0].getsockname()[1]
        ready.set_result(None)
        await self._stopping.wait()
        server.close()
        for client in list(self._clients):
            client.close()
        # Closed connections end their tasks (end of stream); cancel what is still pending.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        _, pending = await asyncio.wait(tasks, timeout=5) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await server.wait_closed()

    def stop(self) -> None:
        """Stop listening and close every open connection. Idempotent."""
        loop, thread, self._thread = self._loop, self._thread, None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(self._stopping.set)
        thread.join(timeout=10)
        log.info("kafka gateway stopped", extra={"address": self.address, **self.stats})

    # -- one connection ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        peer = f"{host}:{port}"
        client = _Client(reader, writer, peer)
        self._clients.add(client)
        self.stats["connections"] += 1
        try:
            if self._ssl is not None and not await self._start_tls(client):
                return
            if self.users is not None:
                authenticated = await asyncio.wait_for(
                    self._authenticate(client, self.users), self.auth_timeout_s
                )
                if not authenticated:
                    # Like Kafka's connection.failed.authentication.delay.ms: slows guessing, and
                    # lets the client read the error before the connection closes.
                    await asyncio.sleep(FAILED_AUTH_DELAY_S)
                    return
            log.info(
                "kafka gateway connection",
                extra={"peer": peer, "tls_subject": client.identity, "user": client.user},
            )
            await self._relay(client)
        except (TimeoutError, MalformedFrame, OSError) as exc:
            log.warning(
                "kafka gateway closed a connection",
                extra={"peer": peer, "reason": f"{type(exc).__name__}: {exc}"},
            )
        except asyncio.IncompleteReadError:
            pass  # the client went away mid-frame
        except asyncio.CancelledError:
            pass  # stop(): end quietly (asyncio reports a cancelled connection task as an error)
        except Exception:
            log.exception("kafka gateway connection failed", extra={"peer": peer})
        finally:
            self._clients.discard(client)
            client.close()

    async def _start_tls(self, client: _Client) -> bool:
        assert self._ssl is not None
        try:
            await client.writer.start_tls(self._ssl, ssl_handshake_timeout=10.0)
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as exc:
            self.stats["tls_failures"] += 1
            log.warning(
                "kafka gateway TLS handshake failed",
                extra={"peer": client.peer, "reason": f"{type(exc).__name__}: {exc}"},
            )
            return False
        cert = client.writer.get_extra_info("peercert") or {}
        client.identity = ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
        return True

    async def _upstream_streams(
        self, client: _Client
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if client.up is None:
            host, port = self._upstream()
            client.up = await asyncio.open_connection(host, port)
        return client.up

    async def _authenticate(self, client: _Client, users: UserStore) -> bool:
        """Answer the SASL exchange; True once the client is authenticated."""
        server: SaslServer | None = None
        raw = False  # SaslHandshake v0: bare size-prefixed tokens follow, no Kafka headers
        while True:
            frame = await read_frame(client.reader, MAX_PREAUTH_FRAME)
            if frame is None:
                return False
            if raw:
                assert server is not None
                try:
                    await client.send(server.step(frame))
                except SaslFailure as exc:
                    self._auth_failed(client, exc)
                    return False  # v0 cannot carry an error: Kafka closes the connection too
                if server.done:
                    return self._auth_ok(client, server)
                continue
            req = parse_request(frame)
            if req.api_key == API_VERSIONS and server is None:
                up_reader, up_writer = await self._upstream_streams(client)
                write_frame(up_writer, frame)
                await up_writer.drain()
                response = await read_frame(up_reader, MAX_PREAUTH_FRAME)
                if response is None:
                    raise ConnectionError("broker closed the connection")
                await client.send(response)
            elif (
                req.api_key == SASL_HANDSHAKE
                and server is None
                and req.api_version <= HANDSHAKE_MAX_VERSION
            ):
                server = await self._handshake(client, req, users)
                if server is None:
                    return False
                raw = req.api_version == 0
            elif (
                req.api_key == SASL_AUTHENTICATE
                and server is not None
                and req.api_version <= AUTHENTICATE_MAX_VERSION
            ):
                if not await self._authenticate_step(client, req, server):
                    return False
                if server.done:
                    return self._auth_ok(client, server)
            else:
                self.stats["rejected"] += 1
                log.warning(
                    "kafka gateway: request before authentication, closing",
                    extra={"peer": client.peer, "api_key": req.api_key, "v": req.api_version},
                )
                return False

    async def _handshake(
        self, client: _Client, req: Request, users: UserStore
    ) -> SaslServer | None:
        mechanism = handshake_mechanism(req)
        if mechanism not in self.mechanisms:
            await client.send(
                handshake_response(req.correlation_id, UNSUPPORTED_SASL_MECHANISM, self.mechanisms)
            )
            self._auth_failed(client, SaslFailure(mechanism[:40], "mechanism not enabled"))
            return None
        await client.send(handshake_response(req.correlation_id, 0, self.mechanisms))
        return new_server(mechanism, users)

    async def _authenticate_step(self, client: _Client, req: Request, server: SaslServer) -> bool:
        try:
            answer = server.step(authenticate_token(req))
        except SaslFailure as exc:
            await client.send(
                authenticate_response(
                    req.api_version,
                    req.correlation_id,
                    SASL_AUTHENTICATION_FAILED,
                    exc.client_message,
                    b"",
                )
            )
            self._auth_failed(client, exc)
            return False
        await client.send(
            authenticate_response(req.api_version, req.correlation_id, 0, None, answer)
        )
        return True

    def _auth_ok(self, client: _Client, server: SaslServer) -> bool:
        self.stats["authenticated"] += 1
        client.user = server.user
        log.debug(
            "kafka gateway authenticated a client",
            extra={"peer": client.peer, "user": server.user, "mechanism": server.mechanism},
        )
        return True

    def _auth_failed(self, client: _Client, exc: SaslFailure) -> None:
        self.stats["auth_failures"] += 1
        log.warning(
            "kafka gateway authentication failed",
            extra={
                "peer": client.peer,
                "tls_subject": client.identity,
                "mechanism": exc.mechanism,
                "user": exc.user,
                "reason": exc.detail,
            },
        )

    async def _relay(self, client: _Client) -> None:
        up_reader, up_writer = await self._upstream_streams(client)
        await asyncio.gather(_copy(client.reader, up_writer), _copy(up_reader, client.writer))


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Relay until either side ends, then close `writer` (which ends the opposite copy too)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:  # a reset connection or a TLS error ends the relay like an end of stream
        pass
    finally:
        writer.close()
