"""The gateway's SASL server (PLAIN, SCRAM per RFC 5802/7677) and its Kafka frames, checked against
the RFC's test vector and kafka-python's own protocol classes (an independent implementation)."""

from __future__ import annotations

import base64

import pytest
from kafka.protocol.sasl import (
    SaslAuthenticateRequest,
    SaslAuthenticateResponse,
    SaslHandshakeRequest,
    SaslHandshakeResponse,
)

from prolifscore.localstack.kafka_frames import (
    SASL_AUTHENTICATION_FAILED,
    MalformedFrame,
    authenticate_response,
    authenticate_token,
    handshake_mechanism,
    handshake_response,
    parse_request,
)
from prolifscore.localstack.kafka_sasl import (
    MECHANISMS,
    PlainServer,
    SaslFailure,
    SaslServer,
    ScramCredential,
    ScramServer,
    UserStore,
    load_users,
    new_server,
    scram_credential,
)

# RFC 7677 section 3: user "user", password "pencil"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_NONCE = RFC_CLIENT_NONCE + RFC_SERVER_NONCE
RFC_PROOF = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="


class RfcUsers(UserStore):
    """The RFC's user with the RFC's salt (UserStore picks random salts)."""

    def scram(self, mechanism: str, user: str) -> ScramCredential | None:
        return scram_credential(mechanism, "pencil", RFC_SALT) if user == "user" else None


@pytest.fixture(scope="module")
def users() -> UserStore:
    return UserStore({"alice": "wonder land", "user": "pencil"}, iterations=4096)


def rfc_server(nonce: str = RFC_SERVER_NONCE) -> ScramServer:
    return ScramServer("SCRAM-SHA-256", RfcUsers({"user": "pencil"}), nonce=nonce)


def test_scram_sha256_matches_the_rfc_7677_exchange():
    server = rfc_server()
    first = server.step(f"n,,n=user,r={RFC_CLIENT_NONCE}".encode())
    assert first.decode() == f"r={RFC_NONCE},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    final = server.step(f"c=biws,r={RFC_NONCE},p={RFC_PROOF}".encode())
    assert final.decode() == "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    assert server.done and server.user == "user"


@pytest.mark.parametrize(
    ("client_final", "reason"),
    [
        (f"c=biws,r={RFC_NONCE},p={base64.b64encode(bytes(32)).decode()}", "wrong password"),
        (f"c=biws,r={RFC_CLIENT_NONCE}other,p={RFC_PROOF}", "nonce mismatch"),
        (f"c=eSws,r={RFC_NONCE},p={RFC_PROOF}", "channel binding data does not match"),
        (f"c=biws,r={RFC_NONCE}", "needs c=, r= and p="),
    ],
)
def test_scram_refuses_a_bad_client_final_message(client_final, reason):
    server = rfc_server()
    server.step(f"n,,n=user,r={RFC_CLIENT_NONCE}".encode())
    with pytest.raises(SaslFailure) as failure:
        server.step(client_final.encode())
    assert reason in failure.value.detail and failure.value.user == "user"
    assert "invalid credentials" in failure.value.client_message and not server.done
    with pytest.raises(SaslFailure, match="unexpected SCRAM message"):
        server.step(b"c=biws")  # no second chance on the same exchange


@pytest.mark.parametrize(
    ("client_first", "reason"),
    [
        (f"p=tls-unique,,n=user,r={RFC_CLIENT_NONCE}", "channel binding is not supported"),
        (f"n,a=admin,n=user,r={RFC_CLIENT_NONCE}", "authorization id differs"),
        (f"n,,n=user,r={RFC_CLIENT_NONCE},tokenauth=true", "delegation tokens"),
        (f"n,,m=ext,n=user,r={RFC_CLIENT_NONCE}", "needs n= and r="),
        (f"n,,n=us=er,r={RFC_CLIENT_NONCE}", "bad escape"),
        ("garbage", "bad header"),
    ],
)
def test_scram_refuses_a_bad_client_first_message(client_first, reason):
    with pytest.raises(SaslFailure, match=reason):
        rfc_server().step(client_first.encode())


def scram_exchange(server: SaslServer, mechanism: str, login: str, password: str) -> bool:
    """Run kafka-python's SCRAM client (it sends `login` as given, unescaped) against `server`."""
    from kafka.net.sasl.scram import SaslMechanismScram

    client = SaslMechanismScram(
        sasl_mechanism=mechanism, sasl_plain_username=login, sasl_plain_password=password
    )
    while not client.is_done():
        client.receive(server.step(client.auth_bytes()))
    return client.is_authenticated()


def test_scram_unescapes_user_names():
    """RFC 5802 5.1: a client sends user "a,b=c" as "a=2Cb=3Dc" (librdkafka does)."""
    store = UserStore({"a,b=c": "pw"})
    server = ScramServer("SCRAM-SHA-256", store)
    assert scram_exchange(server, "SCRAM-SHA-256", "a=2Cb=3Dc", "pw")
    assert server.user == "a,b=c"


def test_unknown_scram_user_looks_like_a_known_one_until_the_proof(users):
    """Same salt on every try, the configured iteration count, failure only at the end."""
    answers = []
    for _ in range(2):
        server = ScramServer("SCRAM-SHA-512", users)
        answers.append(server.step(b"n,,n=mallory,r=abc").decode().split(","))
    (_, salt, iterations), (nonce, salt_again, _) = answers
    assert salt == salt_again and iterations == "i=4096"
    known = ScramServer("SCRAM-SHA-512", users).step(b"n,,n=alice,r=abc").decode()
    assert known.split(",")[1] != salt
    proof = base64.b64encode(bytes(64)).decode()
    with pytest.raises(SaslFailure, match="unknown user"):
        server.step(f"c=biws,{nonce},p={proof}".encode())


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_scram_works_with_kafka_pythons_client(users, mechanism):
    server = new_server(mechanism, users)
    assert scram_exchange(server, mechanism, "alice", "wonder land")
    assert server.done and server.user == "alice"
    with pytest.raises(SaslFailure, match="wrong password"):
        scram_exchange(new_server(mechanism, users), mechanism, "alice", "wonder")


def test_plain_checks_the_password_and_the_authzid(users):
    ok = PlainServer(users)
    assert ok.step(b"\0alice\0wonder land") == b"" and ok.done and ok.user == "alice"
    assert PlainServer(users).step(b"alice\0alice\0wonder land") == b""
    for token, reason in [
        (b"\0alice\0wonder", "wrong password"),
        (b"\0mallory\0wonder land", "unknown user"),
        (b"bob\0alice\0wonder land", "authorization id differs"),
        (b"alice:wonder land", "malformed"),
    ]:
        server = PlainServer(users)
        with pytest.raises(SaslFailure, match=reason):
            server.step(token)
        assert not server.done


def test_users_file(tmp_path):
    path = tmp_path / "users"
    path.write_text("# comment\nalice:pa:ss word\n\n  bob :x\n")
    path.chmod(0o600)
    assert load_users(path) == {"alice": "pa:ss word", "bob": "x"}
    path.write_text("alice\n")
    with pytest.raises(ValueError, match=r"users:1: expected user:password"):
        load_users(path)
    with pytest.raises(ValueError, match="at least one user"):
        UserStore({})
    assert set(MECHANISMS) == {"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"}


# ---------------------------------------------------------------------------------------------
# frames, against kafka-python's encoder and decoder


@pytest.mark.parametrize("version", [0, 1, 2])
def test_sasl_authenticate_frames_in_every_version(version):
    request = SaslAuthenticateRequest(auth_bytes=b"n,,n=alice,r=xyz", version=version)
    request.with_header(correlation_id=41, client_id="rdkafka")
    parsed = parse_request(request.encode(header=True))
    assert (parsed.api_key, parsed.api_version, parsed.correlation_id) == (36, version, 41)
    assert authenticate_token(parsed) == b"n,,n=alice,r=xyz"

    for error, message, token in [(0, None, b"r=abc"), (SASL_AUTHENTICATION_FAILED, "no", b"")]:
        raw = authenticate_response(version, 41, error, message, token)
        decoded = SaslAuthenticateResponse.decode(raw, version=version, header=True)
        assert (decoded.error_code, decoded.error_message, decoded.auth_bytes) == (
            error,
            message,
            token,
        )
        assert decoded.header.correlation_id == 41
        if version >= 1:
            assert decoded.session_lifetime_ms == 0  # no re-authentication


@pytest.mark.parametrize("version", [0, 1])
def test_sasl_handshake_frames(version):
    request = SaslHandshakeRequest(mechanism="SCRAM-SHA-512", version=version)
    request.with_header(correlation_id=3, client_id=None)
    parsed = parse_request(request.encode(header=True))
    assert handshake_mechanism(parsed) == "SCRAM-SHA-512"
    raw = handshake_response(3, 33, ["PLAIN", "SCRAM-SHA-512"])
    decoded = SaslHandshakeResponse.decode(raw, version=version, header=True)
    assert decoded.error_code == 33 and decoded.mechanisms == ["PLAIN", "SCRAM-SHA-512"]


def test_truncated_frames_are_malformed():
    with pytest.raises(MalformedFrame):
        parse_request(b"\x00\x24\x00")
    with pytest.raises(MalformedFrame):
        parse_request(b"\x00\x24\x00\x02\x00\x00\x00\x01\x00\x10ab")
    request = SaslAuthenticateRequest(auth_bytes=b"abc", version=2)
    request.with_header(correlation_id=1, client_id="c")
    with pytest.raises(MalformedFrame):
        authenticate_token(parse_request(request.encode(header=True)[:-3]))
