"""The small routes and conventions clients of vLLM's server rely on: CORS preflight,
/v1/models/{id} with a usable root, /version, /ping, and fields we refuse by name."""
from __future__ import annotations

from radixserve import __version__
from radixserve.cluster.openai_api.app import ServerConfig, build_app
from radixserve.engine.tokenizer import Tokenizer
from tests.cpu.openai_harness import MODEL, assert_error, serve

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}


def test_cors_preflight(http, url, backend):
    # Default: no origin allowed, but the preflight is answered (not a 405).
    r = http.options(f"{url}/v1/completions", headers={"Origin": "http://evil.example", **PREFLIGHT})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    cfg = ServerConfig(allowed_origins=("http://app.example",))
    with serve(build_app(backend, cfg)) as cors_url:
        ok = http.options(f"{cors_url}/v1/completions", headers={"Origin": "http://app.example", **PREFLIGHT})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example"
        bad = http.options(f"{cors_url}/v1/completions", headers={"Origin": "http://evil.example", **PREFLIGHT})
        assert bad.status_code == 400
        r = http.post(f"{cors_url}/v1/completions", headers={"Origin": "http://app.example"},
                      json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"


def test_model_by_id_and_its_root(http, url, engine):
    listed = http.get(f"{url}/v1/models").json()["data"]
    card = http.get(f"{url}/v1/models/{MODEL}").json()
    assert card == listed[0] and card["id"] == MODEL
    assert card["root"] == str(engine.engine.model_dir)
    assert Tokenizer(card["root"]).encode("hello world") == engine.tokenizer.encode("hello world")
    assert_error(http.get(f"{url}/v1/models/no-such-model"), 404, code="model_not_found")


def test_version_and_ping(http, url):
    assert http.get(f"{url}/version").json() == {"version": __version__}
    assert http.get(f"{url}/ping").status_code == 200
    assert http.post(f"{url}/ping").status_code == 200


def test_priority_is_refused_by_name_unless_zero(http, url):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    assert http.post(f"{url}/v1/completions", json={**body, "priority": 0}).status_code == 200
    assert_error(http.post(f"{url}/v1/completions", json={**body, "priority": 5}), 400, param="priority",
                 contains="first come, first served")
