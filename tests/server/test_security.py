"""Tokens, tenants, quotas and TLS, against a real server process over TCP (no worker: jobs stay QUEUED)."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest

import gradserve
from gradserve_server import auth, dev

ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef"
TEXT = "the time traveller smiled round at us " * 60
SMALL = dict(model="rnn", hidden_size=8, batch_size=4, num_steps=10, max_steps=5)


@pytest.fixture(scope="module")
def secured(make_stack, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"alice {auth.hash_token(ALICE)}\nbob {auth.hash_token(BOB)}\n")
    s = make_stack("secured")
    s.start_redis()
    s.start_server("--tokens-file", str(tokens), "--quota-queued", "3")
    return s


def test_no_token_or_a_wrong_one_is_unauthenticated(secured):
    for token in (None, "guess-guess-guess-guess"):
        with gradserve.Client(secured.address, token=token) as c:
            with pytest.raises(gradserve.GradserveError) as err:
                c.list_jobs()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_a_tenant_sees_only_its_own_jobs_and_datasets(secured):
    with gradserve.Client(secured.address, token=ALICE) as alice, gradserve.Client(secured.address, token=BOB) as bob:
        dataset = alice.upload_bytes(TEXT, name="alice's")
        job = alice.submit(dataset=dataset, **SMALL)
        assert job.info.tenant == "alice"

        for call in (lambda: bob.get_job(job.id), lambda: next(iter(gradserve.Job(bob, job.info).events()))):
            with pytest.raises(gradserve.NotFound) as err:
                call()
            assert str(err.value) == f"{job.id} not found (`gradserve list` lists yours)", \
                "another tenant's job must look exactly like a missing one"
        with pytest.raises(gradserve.NotFound):
            gradserve.Job(bob, job.info).cancel()
        with pytest.raises(gradserve.NotFound):
            gradserve.Job(bob, job.info).delete()
        with pytest.raises(gradserve.NotFound, match="upload it first"):
            bob.submit(dataset=dataset, **SMALL)
        assert job.id not in [j.id for j in bob.list_jobs()]
        assert job.id in [j.id for j in alice.list_jobs()]
        assert alice.get_job(job.id).status() == "QUEUED"

        # The same text uploaded by bob is his to use, under the same content-derived id.
        assert bob.upload_bytes(TEXT, name="bob's") == dataset
        bob.submit(dataset=dataset, **SMALL).cancel()


def test_the_queued_jobs_quota_is_per_tenant_and_says_which_quota(secured):
    with gradserve.Client(secured.address, token=BOB) as bob, gradserve.Client(secured.address, token=ALICE) as alice:
        dataset = bob.upload_bytes(TEXT)
        queued = [j for j in bob.list_jobs(state="QUEUED")]
        while len(queued) < 3:
            queued.append(bob.submit(dataset=dataset, **SMALL))
        with pytest.raises(gradserve.GradserveError) as err:
            bob.submit(dataset=dataset, **SMALL)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queued-jobs quota is 3" in str(err.value) and "'bob'" in str(err.value)
        # Cancelling frees the quota; alice's own count is unaffected by bob's.
        queued[0].cancel()
        bob.submit(dataset=dataset, **SMALL)
        alice.submit(dataset=alice.upload_bytes(TEXT), **SMALL)


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=test-ca", cwd=d)
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(extra + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=d)
    return d


def test_mutual_tls_admits_only_clients_with_a_certificate(make_stack, pki):
    s = make_stack("tls")
    s.start_redis()
    port = dev.free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gradserve_server.main", "--redis-url", s.redis_url, "--listen", f"127.0.0.1:{port}",
         "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
         "--tls-client-ca", str(pki / "ca.pem")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    s.server = server  # stopped with the stack
    target = f"127.0.0.1:{port}"
    mutual = dict(ca_file=str(pki / "ca.pem"), cert_file=str(pki / "client.pem"), key_file=str(pki / "client.key"))
    deadline = time.monotonic() + 30
    while True:
        try:
            with gradserve.Client(target, timeout=2, **mutual) as c:
                assert c.list_jobs() == []
            break
        except gradserve.Unavailable:
            assert time.monotonic() < deadline and server.poll() is None, "the TLS server did not come up"
            time.sleep(0.2)

    for options in ({"ca_file": str(pki / "ca.pem")}, {}):  # TLS without a client certificate; plaintext
        with gradserve.Client(target, timeout=3, **options) as c:
            with pytest.raises(gradserve.Unavailable):
                c.list_jobs()
