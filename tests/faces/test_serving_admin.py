"""The search service's admin token: ``POST /reload`` needs ``Authorization: Bearer <token>`` when one is set, the
token comes from ``--admin-token-file`` or ``FCT_REGISTRY_ADMIN_TOKEN``, and ``serve`` refuses a non-loopback host
without one before it loads or binds anything. Served for real by uvicorn on loopback (in-process and as the
``fct-registry serve`` process)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import factories
import httpx
import pytest
from cli_checks import fails
from serving_checks import TOKEN, one_line_detail, running, v3_sets_root
from typer.testing import CliRunner

from fct_registry.cli import app as cli
from fct_registry.core.errors import ConfigError, VersionMismatchError
from fct_registry.serving.app import create_app
from fct_registry.serving.server import serve
from fct_registry.usecases.ui import ADMIN_TOKEN_ENV, admin_token, is_loopback

NOT_LOOPBACK = "refusing to serve on non-loopback host '0.0.0.0' without an admin token"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> factories.World:
    return factories.shared_world(tmp_path_factory)


@pytest.fixture(scope="module")
def v3_sets(world, tmp_path_factory) -> Path:
    return v3_sets_root(world, tmp_path_factory.mktemp("admin"))


@pytest.fixture(scope="module")
def guarded(world, v3_sets) -> Iterator[httpx.Client]:
    """A client of the service started with the admin token :data:`TOKEN`."""
    with running(create_app(world.registry, v3_sets, admin_token=TOKEN)) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        yield http


@pytest.mark.parametrize(("header", "reason"), [
    (None, "needs 'Authorization: Bearer <admin token>'; the request has none"),
    ("Bearer not-the-token-at-all-0123", "the admin token sent in 'Authorization: Bearer' is wrong"),
    (f"Bearer {TOKEN[:-1]}", "is wrong"),
    (f"Bearer {TOKEN}x", "is wrong"),
    (f"Basic {TOKEN}", "the request has none"),
    (TOKEN, "the request has none"),
])
def test_reload_without_the_right_token_is_401_and_changes_nothing(guarded, header, reason):
    before = guarded.get("/info").json()
    response = guarded.post("/reload", headers={} if header is None else {"Authorization": header})
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    detail = one_line_detail(response)
    assert reason in detail and TOKEN not in detail
    assert guarded.get("/info").json() == before


def test_reload_with_the_token_swaps_and_queries_need_none(guarded, world):
    for scheme in ("Bearer", "bearer"):
        response = guarded.post("/reload", headers={"Authorization": f"{scheme} {TOKEN}"})
        assert response.status_code == 200, response.text
        assert response.json()["backbone"]["label"] == "v3"
    assert guarded.get("/health").status_code == 200 and guarded.get("/info").status_code == 200
    search = guarded.post("/search", json={"embedding": [0.5] * factories.DIMS["v3"], "k": 2})
    assert search.status_code == 200, search.text


def test_the_token_comes_from_the_file_else_the_variable(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    other = "from-the-environment-0123456789"
    assert admin_token(token_file, {ADMIN_TOKEN_ENV: other}) == TOKEN  # the file wins
    assert admin_token(None, {ADMIN_TOKEN_ENV: f" {other}\n"}) == other
    assert admin_token(None, {}) is None and admin_token(None, {ADMIN_TOKEN_ENV: "  "}) is None


@pytest.mark.parametrize(("content", "reason"), [
    (None, "cannot read admin token file"),
    ("\n", "is empty; expected one line holding the token"),
    ("short-token", "has 11 characters; expected at least 16"),
    ("two words in one token", "holds a space or a character other than printable ASCII (at position 3)"),
    ("tökén-with-accents-0123456789", "other than printable ASCII (at position 1)"),
])
def test_a_bad_token_file_is_one_line_naming_it(tmp_path, content, reason):
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(reason)) as error:
        admin_token(token_file, {})
    assert "\n" not in str(error.value) and str(token_file) in str(error.value)
    assert content is None or content.strip() == "" or content.strip() not in str(error.value)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST.", True), ("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("example.com", False),
    ("", False),
])
def test_which_hosts_are_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_serve_refuses_a_non_loopback_host_without_a_token_before_loading(world):
    """The shared world has no v3 gallery: getting past the host check shows as the gallery refusal instead."""
    with pytest.raises(ConfigError, match=NOT_LOOPBACK):
        serve(world.registry, world.sets_root, host="0.0.0.0", port=0)
    with pytest.raises(VersionMismatchError, match="cannot serve @champion"):
        serve(world.registry, world.sets_root, host="0.0.0.0", port=0, admin_token=TOKEN)


def test_cli_serve_refuses_a_non_loopback_host_without_a_token(world, tmp_path):
    runner = CliRunner(env={ADMIN_TOKEN_ENV: None})
    command = ["--root", str(world.root), "serve", "--host", "0.0.0.0", "--port", "0"]
    fails(runner.invoke(cli.app, command), NOT_LOOPBACK, ADMIN_TOKEN_ENV, "--admin-token-file")
    fails(CliRunner(env={ADMIN_TOKEN_ENV: TOKEN}).invoke(cli.app, command), "cannot serve @champion")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    fails(runner.invoke(cli.app, [*command, "--admin-token-file", str(token_file)]), "cannot serve @champion")
    token_file.write_text("")
    fails(runner.invoke(cli.app, [*command, "--admin-token-file", str(token_file)]), "is empty")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fct_registry_serve_process_guards_reload_with_the_token_file(world, v3_sets, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    port = free_port()
    command = [sys.executable, "-c", "from fct_registry.cli.app import app; app()", "--root", str(world.root),
               "--sets-root", str(v3_sets), "serve", "--port", str(port), "--admin-token-file", str(token_file)]
    env = {key: value for key, value in os.environ.items() if key != ADMIN_TOKEN_ENV}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            deadline = time.monotonic() + 90
            while True:
                assert process.poll() is None, process.communicate()[0]
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "fct-registry serve did not answer within 90 s"
                    time.sleep(0.2)
            assert http.post("/reload").status_code == 401
            assert http.post("/reload", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
            reloaded = http.post("/reload", headers={"Authorization": f"Bearer {TOKEN}"})
            assert reloaded.status_code == 200, reloaded.text
            assert reloaded.json()["gallery"]["path"] == str(v3_sets / "gallery_v1@v3")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
