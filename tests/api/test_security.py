"""The token file, bearer comparison and the local-Host rule."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from gpusm.api.security import HostGuard, bearer_matches, host_of, load_or_create_token
from gpusm.errors import ConfigError
from gpusm.wire import read_token


@pytest.fixture(autouse=True)
def no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUSM_TOKEN", raising=False)


def test_first_start_creates_a_private_random_token_and_later_starts_reuse_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state" / "api-token"
    token = load_or_create_token(path)
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path) == token
    assert read_token(path) == token
    assert load_or_create_token(tmp_path / "other") != token


def test_token_from_the_environment_wins_and_no_file_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUSM_TOKEN", " from-env ")
    path = tmp_path / "api-token"
    assert load_or_create_token(path) == "from-env"
    assert not path.exists()


def test_a_token_file_others_can_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "api-token"
    path.write_text("secret")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by other users") as caught:
        read_token(path)
    assert caught.value.fix == f"chmod 600 {path}"


def test_an_empty_or_unreadable_token_file_is_a_config_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(ConfigError, match="empty"):
        load_or_create_token(empty)
    folder = tmp_path / "folder"
    folder.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="cannot read"):
        read_token(folder)
    assert read_token(None) is None
    assert read_token(tmp_path / "missing") is None


def test_a_token_that_cannot_be_created_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot create"):
        load_or_create_token(blocker / "api-token")


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("Bearer s3cret", True),
        ("bearer s3cret", True),
        ("Bearer  s3cret ", True),
        ("Bearer s3cre", False),
        ("Bearer s3cretX", False),
        ("Basic s3cret", False),
        ("s3cret", False),
        ("", False),
        (None, False),
        ("Bearer s\u00e9cret", False),
    ],
)
def test_bearer_token_must_match_exactly(header: str | None, ok: bool) -> None:
    assert bearer_matches(header, "s3cret") is ok


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("127.0.0.1:7723", "127.0.0.1"),
        ("LocalHost", "localhost"),
        ("localhost.:80", "localhost"),
        ("[::1]:7723", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("evil.example:8080", "evil.example"),
        ("host:notaport", "host:notaport"),
    ],
)
def test_host_of_strips_port_brackets_case_and_final_dot(header: str, host: str) -> None:
    assert host_of(header) == host


def test_host_guard_allows_only_local_names_and_the_listen_host() -> None:
    guard = HostGuard(["gpu-box.lan", ""])
    for ok in ("127.0.0.1", "localhost:1", "[::1]:2", "gpu-box.lan:7723"):
        assert guard.allows(ok), ok
    for bad in ("evil.example", "127.0.0.2", "localhost.evil.example", "", None):
        assert not guard.allows(bad), bad
