"""Bearer tokens, and the refusal to serve a network without them: no Ray needed.

The running service's side of it (every /v1/ route needs a token, the page does not) is
tests/test_serve_security.py's.
"""

import pytest
from serve_helpers import TOKEN

from serve_app import tokens
from serve_app.app import app_builder, build_app, deployment_options, load_serve_config
from serve_app.auth import TOKEN_HASHES_ENV, TokenChecker, hash_token, load_token_hashes, parse_token_hashes


def test_token_cli_prints_a_token_and_the_hash_the_service_accepts(tmp_path, capsys):
    hashes = tmp_path / "hashes.txt"
    tokens.main(["new", "--append", str(hashes)])
    printed = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    token, digest = printed["token"].strip(), printed["sha256"].strip()
    assert len(token) >= 40 and digest == hash_token(token)
    assert hashes.read_text().split() == [digest]  # the file holds the hash, never the token
    assert token not in hashes.read_text()
    checker = TokenChecker(load_token_hashes(str(hashes), environ={}))
    assert checker.token_id(f"Bearer {token}") == digest[:8]
    assert checker.token_id(f"bearer  {token} ") == digest[:8]
    for refused in (None, "", token, f"Basic {token}", f"Bearer {token}x", "Bearer ", f"Bearer {digest}"):
        assert checker.token_id(refused) is None, refused


def test_hashes_come_from_the_environment_too_and_a_token_in_their_place_is_refused(tmp_path):
    one, two = hash_token("one"), hash_token("two")
    assert load_token_hashes(None, environ={TOKEN_HASHES_ENV: f"{one}, {two.upper()}"}) == sorted([one, two])
    assert parse_token_hashes(f"# comment\n{one}  # the ward's client\n\n", source="x") == [one]
    with pytest.raises(ValueError, match="entry 2 of x is not a SHA-256") as error:
        parse_token_hashes(f"{one}\nsecret-token-pasted-by-mistake", source="x")
    assert "secret-token" not in str(error.value)
    with pytest.raises(FileNotFoundError):
        load_token_hashes(str(tmp_path / "missing"), environ={})


def test_without_tokens_only_loopback_or_an_explicit_flag_may_serve(tiny_model_dir, monkeypatch):
    monkeypatch.delenv(TOKEN_HASHES_ENV, raising=False)
    args = {"model": str(tiny_model_dir)}
    options = deployment_options(load_serve_config()["applications"][0])
    for host in ("0.0.0.0", "10.1.2.3", "::", None):
        with pytest.raises(ValueError, match="refusing to serve without authentication"):
            build_app(args, options, bind_host=host)
    with pytest.raises(ValueError, match="token"):
        app_builder(args)  # serve run / serve deploy: where it listens is unknown
    for host in ("127.0.0.1", "::1", "localhost"):
        build_app(args, options, bind_host=host)
    build_app({**args, "insecure_no_auth": True}, options, bind_host="0.0.0.0")
    monkeypatch.setenv(TOKEN_HASHES_ENV, hash_token(TOKEN))
    app_builder(args)
