"""Bearer-token auth (scopes, live reload of the token file) and TLS, on the real server."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest

from tests.hardening_util import add_digits, digits_body
from tests.kiln_server import start_server

INFER, REPO, ROOT = "infer-token-1", "repo-token-2", "root-token-3"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    repo = tmp / "repo"
    add_digits(repo)
    tokens = tmp / "tokens"
    tokens.write_text(f"# kiln tokens\n{INFER} infer\n{REPO} repository\n{ROOT} *\n")
    srv = start_server(repo, log_dir=tmp, args=["--auth-tokens-file", str(tokens)])
    yield srv, tokens
    assert srv.stop() == 0


def _h(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def test_infer_needs_a_token_with_the_infer_scope(secured):
    srv, _ = secured
    url = srv.url + "/v2/models/digits-cnn/infer"
    r = httpx.post(url, content=digits_body())
    assert r.status_code == 401 and set(r.json()) == {"error"} and r.headers["www-authenticate"].startswith("Bearer")
    assert httpx.post(url, content=digits_body(), headers=_h("wrong")).status_code == 401
    assert httpx.post(url, content=digits_body(), headers={"Authorization": f"Basic {INFER}"}).status_code == 401
    r = httpx.post(url, content=digits_body(), headers=_h(REPO))
    assert r.status_code == 403 and "'infer' scope" in r.json()["error"]
    assert httpx.post(url, content=digits_body(), headers=_h(INFER)).status_code == 200
    assert httpx.post(url, content=digits_body(), headers=_h(ROOT)).status_code == 200
    assert httpx.get(srv.url + "/v2/models/digits-cnn", headers=_h(INFER)).status_code == 200
    assert httpx.get(srv.url + "/v2/models/digits-cnn").status_code == 401


def test_repository_api_has_its_own_scope(secured):
    srv, _ = secured
    assert httpx.post(srv.url + "/v2/repository/index").status_code == 401
    r = httpx.post(srv.url + "/v2/repository/index", headers=_h(INFER))
    assert r.status_code == 403 and "'repository' scope" in r.json()["error"]
    assert httpx.post(srv.url + "/v2/repository/models/digits-cnn/unload", headers=_h(INFER)).status_code == 403
    r = httpx.post(srv.url + "/v2/repository/index", headers=_h(REPO))
    assert r.status_code == 200 and r.json()[0]["name"] == "digits-cnn"
    # Rollouts change routing like load/unload change models: the same scope.
    rollout = srv.url + "/v2/repository/models/digits-cnn/rollout"
    assert httpx.post(rollout, json={"action": "cancel"}, headers=_h(INFER)).status_code == 403
    assert httpx.get(rollout).status_code == 401
    r = httpx.get(rollout, headers=_h(REPO))
    assert r.status_code == 200 and r.json()["stable_version"] == "1"


def test_health_and_metrics_stay_open(secured):
    srv, _ = secured
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
        assert httpx.get(srv.url + path).status_code == 200, path


def test_token_file_is_reread_when_it_changes(secured):
    srv, tokens = secured
    url = srv.url + "/v2/models/digits-cnn/infer"
    original = tokens.read_text()
    try:
        tokens.write_text(f"rotated-token infer\n{ROOT} *\n")  # INFER revoked, a new one issued
        time.sleep(1.3)
        assert httpx.post(url, content=digits_body(), headers=_h("rotated-token")).status_code == 200
        assert httpx.post(url, content=digits_body(), headers=_h(INFER)).status_code == 401
        tokens.write_text("this line has an unknown-scope\n")  # a bad file keeps the last good tokens
        time.sleep(1.3)
        assert httpx.post(url, content=digits_body(), headers=_h("rotated-token")).status_code == 200
        assert "not reloaded" in srv.log()
    finally:
        tokens.write_text(original)
        time.sleep(1.3)
    assert httpx.post(url, content=digits_body(), headers=_h(INFER)).status_code == 200


def test_missing_tokens_file_refuses_to_start(tmp_path):
    repo = tmp_path / "repo"
    add_digits(repo)
    srv = start_server(repo, log_dir=tmp_path, args=["--auth-tokens-file", str(tmp_path / "nope")], wait=False)
    assert srv.proc.wait(60) == 2
    assert "auth tokens file" in srv.log()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_with_a_self_signed_certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    repo = tmp_path / "repo"
    add_digits(repo)
    srv = start_server(repo, log_dir=tmp_path, wait=False,
                       args=["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)])
    try:
        base = f"https://127.0.0.1:{srv.port}"
        with httpx.Client(base_url=base, verify=str(cert), timeout=10) as https:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if https.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert srv.proc.poll() is None, srv.log()
                time.sleep(0.2)
            r = https.post("/v2/models/digits-cnn/infer", content=digits_body())
            assert r.status_code == 200 and len(r.json()["outputs"][0]["data"]) == 10
            # A body over several reads (trailing JSON whitespace): read straight into its buffer
            # through the TLS transport too (service/http_protocol.py).
            big = https.post("/v2/models/digits-cnn/infer", content=digits_body() + b" " * 300_000)
            assert big.status_code == 200 and big.json()["outputs"] == r.json()["outputs"]
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets no answer
            httpx.get(f"http://127.0.0.1:{srv.port}/v2/health/live", timeout=5)
        assert "https://" in srv.log()
    finally:
        assert srv.stop() == 0
