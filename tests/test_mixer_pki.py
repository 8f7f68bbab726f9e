"""The hub's CA and server certificate: files and modes, no overwrite, and real TLS
handshakes that a rack holding ca.pem can verify (and a stranger's CA cannot)."""

from __future__ import annotations

import socket
import ssl
import stat
import threading

import pytest
from typer.testing import CliRunner

from mixer.cli import app
from mixer.pki import HubPki, PkiError, certificate_hosts, init_pki


def _handshake(pki: HubPki, ca_file, server_hostname: str) -> str:
    """TLS over a real socket pair: the hub's certificate served, verified by the client."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.hub_cert, pki.hub_key)
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"hub")
        except (ssl.SSLError, OSError) as exc:  # the client refused us: expected in some cases
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            return tls.recv(3).decode()
    finally:
        t.join(10)
        listener.close()


def test_init_writes_a_ca_and_a_hub_certificate_with_private_keys_0600(tmp_path):
    pki = init_pki(tmp_path, ["127.0.0.1", "hub.plant.local"])
    for key in (pki.ca_key, pki.hub_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert certificate_hosts(pki.hub_cert) == ["hub.plant.local", "127.0.0.1"]
    assert _handshake(pki, pki.ca_cert, "127.0.0.1") == "hub"
    assert _handshake(pki, pki.ca_cert, "hub.plant.local") == "hub"


def test_a_name_not_in_the_certificate_or_another_ca_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    pki = init_pki(tmp_path / "a", ["127.0.0.1"])
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|match"):
        _handshake(pki, pki.ca_cert, "evil.example")
    (tmp_path / "b").mkdir()
    stranger = init_pki(tmp_path / "b", ["127.0.0.1"])
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _handshake(pki, stranger.ca_cert, "127.0.0.1")


def test_existing_key_material_is_never_overwritten(tmp_path):
    pki = init_pki(tmp_path, ["127.0.0.1"])
    before = pki.ca_key.read_bytes()
    with pytest.raises(PkiError, match=f"refusing to overwrite existing key material: {pki.ca_cert}"):
        init_pki(tmp_path, ["127.0.0.1"])
    assert pki.ca_key.read_bytes() == before


def test_mixer_init_cli(tmp_path):
    runner = CliRunner()
    hub = tmp_path / "hub"
    out = runner.invoke(app, ["init", str(hub), "--host", "10.0.0.5"])
    assert out.exit_code == 0, out.output
    assert stat.S_IMODE(hub.stat().st_mode) == 0o700
    assert certificate_hosts(hub / "pki" / "hub.pem") == ["10.0.0.5"]
    again = runner.invoke(app, ["init", str(hub)])
    assert again.exit_code == 1
    assert "refusing to overwrite existing key material" in again.stderr
