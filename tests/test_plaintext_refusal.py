"""A plain-text client is refused by the TLS SuperLink, and a hang-up alone does not count as that refusal (#22).

A real SuperLink (the deployment's own launch script and keys) on loopback, probed with Python's HTTP client in
plain text, as an insecure SuperNode would connect: no HTTP answer comes back, while the same request over TLS
with the consortium CA is answered, so the silence is the TLS server refusing plain text, not a dead port.
The deployment's own check must agree, and must not call a port that hangs up on everyone "refused". The same
plain client is answered by a SuperLink started without TLS (the probe can tell the two apart). About 10 s.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
from pathlib import Path

import pytest

from pmlm.deploy.local import LocalDeployment

pytestmark = pytest.mark.deployment
REQUEST = ("POST", "/v1/fleet/activate-node")


def plain_client_status(port: int) -> int | None:
    """The HTTP status a plain-text client gets, or None when the server closes without answering."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(*REQUEST, body=b"", headers={"Content-Length": "0"})
        return connection.getresponse().status
    except (http.client.RemoteDisconnected, ConnectionResetError, http.client.BadStatusLine):
        return None
    finally:
        connection.close()


def tls_client_status(port: int, ca: Path) -> int:
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                             context=ssl.create_default_context(cafile=str(ca)))
    try:
        connection.request(*REQUEST, body=b"", headers={"Content-Length": "0"})
        return connection.getresponse().status
    finally:
        connection.close()


class HangUp:
    """A port that accepts every connection and closes it at once, answering nothing."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            connection.close()


def test_a_plain_text_client_is_refused_by_the_tls_superlink_and_a_hang_up_is_not_a_refusal(tmp_path):
    link = LocalDeployment(tmp_path / "tls", {}, tls=True)
    try:
        link.prepare()
        link.start_superlink()
        assert plain_client_status(link.link_port) is None  # refused: no HTTP answer to plain text
        assert 200 <= tls_client_status(link.link_port, link.keys_dir / "ca.pem") < 600  # ... from a live server
        link.check_plaintext_refused()
        assert link.checks[-1].ok, link.checks[-1]
        assert plain_client_status(link.link_port) is None  # and it keeps refusing

        hang_up = HangUp()
        link.link_port = hang_up.port  # the same check against a port that hangs up on everyone
        link.check_plaintext_refused()
        assert not link.checks[-1].ok, "a hang-up from a port that answers nobody was counted as a refusal"
        hang_up.socket.close()
    finally:
        link.processes.close()

    insecure = LocalDeployment(tmp_path / "plain", {}, tls=False)
    try:
        insecure.prepare()
        insecure.start_superlink()
        assert plain_client_status(insecure.link_port) is not None  # without TLS the same client is answered
    finally:
        insecure.processes.close()
