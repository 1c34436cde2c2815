"""Who may talk to the server: loopback by default, an optional API key, local Host names, listed CORS origins."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, free_port, read_log_until_listening

import imagine

ROOT = Path(imagine.__file__).resolve().parent

BODY = {"prompt": "x", **FAST}


@pytest.fixture
def app_with(make_engine):
    """Builds an app on a fresh engine (demo model) with the given settings; returns its test client."""
    return lambda **settings: imagine.create_app(make_engine(model="demo", **settings)).test_client()


def test_the_server_listens_on_loopback_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("IMAGINE_HOST", raising=False)
    assert imagine.parse_settings([]).host == "127.0.0.1"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}],
)
def test_with_an_api_key_a_request_without_the_right_bearer_header_gets_401(app_with, headers):
    client = app_with(api_key="s3cret")
    response = client.post("/generate", json=BODY, headers=headers)
    assert response.status_code == 401
    assert "Authorization: Bearer" in response.get_json()["error"]
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_with_an_api_key_the_right_bearer_header_is_served(app_with):
    client = app_with(api_key="s3cret")
    assert client.post("/generate", json=BODY, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_the_api_key_comes_from_a_flag_or_the_environment(monkeypatch):
    monkeypatch.setenv("IMAGINE_API_KEY", "from-env")
    assert imagine.parse_settings([]).api_key == "from-env"
    assert imagine.parse_settings(["--api-key", "from-flag"]).api_key == "from-flag"


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:5000", "192.168.1.10:5000", "127.0.0.1.nip.io"])
def test_on_loopback_a_host_header_that_is_not_a_local_name_is_refused(app_with, host):
    response = app_with().post("/generate", json=BODY, base_url=f"http://{host}")
    assert response.status_code == 403
    assert "not a local name" in response.get_json()["error"]


@pytest.mark.parametrize("host", ["localhost:5000", "127.0.0.1:5000", "[::1]:5000", "imagine.localhost"])
def test_on_loopback_local_host_names_are_served(app_with, host):
    assert app_with().post("/generate", json=BODY, base_url=f"http://{host}").status_code == 200


def test_listening_on_all_interfaces_with_a_key_serves_any_host_name(app_with):
    # Without a key only the machine's addresses and names are served (test_hard_to_knock_over, 13h).
    client = app_with(host="0.0.0.0", api_key="s3cret")
    headers = {"Authorization": "Bearer s3cret"}
    assert client.post("/generate", json=BODY, base_url="http://imagine.lan:5000", headers=headers).status_code == 200


def test_a_request_from_a_web_page_of_an_unlisted_origin_is_refused(app_with):
    response = app_with().post("/generate", json=BODY, headers={"Origin": "http://attacker.example"})
    assert response.status_code == 403
    assert "--cors-origins" in response.get_json()["error"]
    assert "Access-Control-Allow-Origin" not in response.headers


def test_a_listed_origin_gets_its_preflight_answered_and_its_request_served(app_with):
    client = app_with(cors_origins=("http://localhost:3000",), api_key="s3cret")
    preflight = client.options(
        "/generate",
        headers={
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    headers = {"Origin": "http://localhost:3000", "Authorization": "Bearer s3cret"}
    response = client.post("/generate", json=BODY, headers=headers)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    refused = client.post("/generate", json={"prompt": 5}, headers=headers)
    assert refused.status_code == 400 and refused.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"


def test_cors_origins_come_from_a_comma_separated_flag_or_the_environment(monkeypatch):
    monkeypatch.setenv("IMAGINE_CORS_ORIGINS", "http://a.example, https://b.example/")
    assert imagine.parse_settings([]).cors_origins == ("http://a.example", "https://b.example")
    assert imagine.parse_settings(["--cors-origins", "*"]).cors_origins == ("*",)
    monkeypatch.delenv("IMAGINE_CORS_ORIGINS")
    assert imagine.parse_settings([]).cors_origins == ()


@pytest.mark.parametrize(
    "extra, warned", [([], False), (["--host", "0.0.0.0"], True), (["--host", "0.0.0.0", "--api-key", "k"], False)]
)
def test_listening_beyond_this_machine_without_a_key_is_warned_about_in_the_log(tmp_path, extra, warned):
    command = [sys.executable, str(ROOT / "imagine.py"), "--models-dir", str(tmp_path), "-d", "cpu", *extra]
    process = subprocess.Popen([*command, "--port", str(free_port())], stderr=subprocess.PIPE, text=True)
    try:
        log = read_log_until_listening(process)
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert ("no API key is set" in "".join(log)) is warned, "".join(log)
