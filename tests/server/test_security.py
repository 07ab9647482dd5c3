"""TLS, mutual TLS and bearer tokens against real servers, with a certificate authority made
in the test; model names never reach the file system."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from live_server import DENSITIES, metric, start_server

from client import TLS, Client, OdeServeError
from odeserve.v1 import odeserve_pb2 as pb
from odeserve.v1 import odeserve_pb2_grpc as pb_grpc

DENSITY = DENSITIES[0]
POINTS = np.zeros((2, 2), np.float32)
TOKENS = ("token-from-file-3f9a", "second-token-77c1")
ENV_TOKEN = "token-from-environment-b2d4"


@dataclass
class Identity:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def pem_key(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def pem_cert(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, folder: Path, name: str) -> tuple[Path, Path]:
        key, cert = folder / f"{name}.key", folder / f"{name}.crt"
        key.write_bytes(self.pem_key())
        cert.write_bytes(self.pem_cert())
        return key, cert


def issue(common_name: str, issuer: Identity | None = None, *, server: bool = False, client: bool = False) -> Identity:
    """A certificate authority (no ``issuer``) or a leaf signed by ``issuer``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return Identity(key, builder.sign(issuer.key if issuer else key, hashes.SHA256()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = issue("odeserve test CA"), issue("somebody else's CA")
    files = {"folder": folder, "ca": ca, "rogue_ca": rogue_ca}
    files["server_key"], files["server_cert"] = issue("odeserve", ca, server=True).write(folder, "server")
    files["ca_cert"] = ca.write(folder, "ca")[1]
    files["client"] = issue("trusted client", ca, client=True)
    files["rogue_client"] = issue("rogue client", rogue_ca, client=True)
    return files


@pytest.fixture(scope="module")
def tls_server(pki, density_only, tmp_path_factory):
    """TLS plus bearer tokens from a file and from the environment."""
    token_file = pki["folder"] / "tokens"
    token_file.write_text(f"# accepted tokens\n{TOKENS[0]}\n\n{TOKENS[1]}  # for the second team\n")
    running = start_server(
        density_only,
        tmp_path_factory.mktemp("tls"),
        "--tls-cert",
        str(pki["server_cert"]),
        "--tls-key",
        str(pki["server_key"]),
        "--token-file",
        str(token_file),
        env={"ODESERVE_TOKENS": ENV_TOKEN},
    )
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def mtls_server(pki, density_only, tmp_path_factory):
    running = start_server(
        density_only,
        tmp_path_factory.mktemp("mtls"),
        "--tls-cert",
        str(pki["server_cert"]),
        "--tls-key",
        str(pki["server_key"]),
        "--tls-client-ca",
        str(pki["ca_cert"]),
    )
    yield running
    assert running.stop() == 0


def trusting(pki, identity: Identity | None = None) -> TLS:
    return TLS(pki["ca"].pem_cert(), identity and identity.pem_key(), identity and identity.pem_cert())


def log_density(target: str, tls: TLS | None, token: str | None = None):
    with Client(target, timeout_s=20, tls=tls, token=token, retries=0) as client:
        return client.log_density(POINTS, model=DENSITY, tol=1e-3)


@pytest.mark.parametrize("token", [*TOKENS, ENV_TOKEN])
def test_tls_with_an_accepted_token_is_served(pki, tls_server, token):
    result = log_density(tls_server.target, trusting(pki), token)
    assert result.items.all_succeeded and np.isfinite(result.log_density).all()


@pytest.mark.parametrize(
    "token, message",
    [
        (None, "missing 'authorization: Bearer <token>' metadata"),
        ("not-a-token", "the bearer token is not accepted"),
        (TOKENS[0][:-1], "the bearer token is not accepted"),
        (TOKENS[0] + "x", "the bearer token is not accepted"),
    ],
)
def test_missing_or_wrong_token_is_unauthenticated(pki, tls_server, token, message):
    with pytest.raises(OdeServeError) as error:
        log_density(tls_server.target, trusting(pki), token)
    assert (error.value.code, error.value.message) == ("UNAUTHENTICATED", message)


def test_a_token_needs_the_bearer_scheme(pki, tls_server):
    channel = grpc.secure_channel(tls_server.target, trusting(pki).credentials())
    with channel, pytest.raises(grpc.RpcError) as error:
        pb_grpc.InferenceStub(channel).ListModels(
            pb.ListModelsRequest(), timeout=20, metadata=(("authorization", f"Basic {TOKENS[0]}"),)
        )
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "must be 'Bearer <token>'" in error.value.details()


def test_health_needs_no_token_and_refusals_are_counted(pki, tls_server):
    with grpc.secure_channel(tls_server.target, trusting(pki).credentials()) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "odeserve.v1.Inference", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=20)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(OdeServeError):
        log_density(tls_server.target, trusting(pki), None)
    assert metric(tls_server.metrics_url, "odeserve_requests_total", code="UNAUTHENTICATED") >= 1


def test_health_does_not_confirm_model_names_without_a_token(pki, tls_server):
    """ListModels needs a token; so does learning from health that a model name exists: without
    one, a served model's name is answered as a made-up one is."""
    with grpc.secure_channel(tls_server.target, trusting(pki).credentials()) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def check(service: str, token: str | None = None):
            metadata = (("authorization", f"Bearer {token}"),) if token else None
            request = health_pb2.HealthCheckRequest(service=service)
            try:
                return health.Check(request, timeout=20, metadata=metadata).status
            except grpc.RpcError as error:
                return error.code(), error.details()

        assert check(DENSITY) == check("no-such-model") == check(DENSITY, "not-a-token")
        assert check(DENSITY)[0] == grpc.StatusCode.NOT_FOUND
        assert check(DENSITY, TOKENS[0]) == health_pb2.HealthCheckResponse.SERVING
        assert check("no-such-model", TOKENS[0])[0] == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service=DENSITY), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        watch.cancel()


@pytest.mark.parametrize("tls", ["plaintext", "untrusted server"])
def test_clients_that_cannot_verify_the_server_get_nothing(pki, tls_server, tls):
    settings = None if tls == "plaintext" else TLS(pki["rogue_ca"].pem_cert())
    with pytest.raises(OdeServeError) as error:
        log_density(tls_server.target, settings, TOKENS[0])
    assert error.value.code == "UNAVAILABLE"


def test_mutual_tls_serves_a_client_certificate_from_the_ca(pki, mtls_server):
    assert log_density(mtls_server.target, trusting(pki, pki["client"])).items.all_succeeded


@pytest.mark.parametrize("identity", [None, "rogue_client"])
def test_mutual_tls_refuses_clients_without_a_trusted_certificate(pki, mtls_server, identity):
    with pytest.raises(OdeServeError) as error:
        log_density(mtls_server.target, trusting(pki, identity and pki[identity]))
    assert error.value.code == "UNAVAILABLE"


@pytest.mark.parametrize(
    "name",
    [
        "../checkpoints/cnf-moons",
        "/etc/passwd",
        f"{DENSITY}.pt",
        "..",
        f"./{DENSITY}",
        "%2e%2e%2fetc",
        f"{DENSITY}\x00",
        "C:\\x",
    ],
)
def test_path_like_model_names_are_not_found(server, name):
    with Client(server.target, timeout_s=20) as client, pytest.raises(OdeServeError) as error:
        client.log_density(POINTS, model=name, tol=1e-3)
    assert error.value.code == "NOT_FOUND"


def test_tls_settings_must_come_together(density_only, tmp_path):
    with pytest.raises(RuntimeError, match="tls_cert and tls_key go together"):
        start_server(density_only, tmp_path, "--tls-cert", "server.crt")
