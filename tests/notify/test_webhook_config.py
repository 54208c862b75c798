"""``notify:``: what a webhook entry accepts, and every refusal named by key with a fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpusm.config import parse_config
from gpusm.domain.events import EVENT_TYPES
from gpusm.errors import ConfigError
from gpusm.wiring import open_notifier


def parse(tmp_path: Path, **hook: Any) -> Any:
    entry = {"url": "http://127.0.0.1:9/hook", "secret_file": "hook.secret", **hook}
    return parse_config({"notify": [entry]}, source="gpusm.yaml", base=tmp_path)


def test_defaults_send_every_event_type_with_a_sane_backoff(tmp_path: Path) -> None:
    hook = parse(tmp_path).notify[0]
    assert hook.types is None
    assert hook.events == ["*"]
    assert (hook.min_backoff_s, hook.max_backoff_s, hook.timeout_s) == (1.0, 60.0, 10.0)
    assert hook.key == "http://127.0.0.1:9/hook"


def test_a_relative_secret_file_is_resolved_against_the_config_folder(tmp_path: Path) -> None:
    assert parse(tmp_path).notify[0].secret_file == tmp_path / "hook.secret"


def test_chosen_event_types_are_kept_in_order_without_repeats(tmp_path: Path) -> None:
    hook = parse(tmp_path, events=["Crashed", "Evicted", "Crashed"]).notify[0]
    assert hook.types == ("Crashed", "Evicted")


def test_an_unknown_event_type_is_refused_naming_the_key_and_every_valid_name(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(tmp_path, events=["Crashed", "Evictd"])
    assert caught.value.key == "notify[0].events"
    assert "unknown event type 'Evictd' (did you mean 'Evicted'?)" in str(caught.value)
    assert all(name in str(caught.value) for name in EVENT_TYPES)


@pytest.mark.parametrize(
    ("hook", "key", "says"),
    [
        ({"url": "ftp://example.com/x"}, "notify[0].url", "http:// or https://"),
        ({"url": "file:///etc/passwd"}, "notify[0].url", "http:// or https://"),
        ({"url": "http:///nohost"}, "notify[0].url", "with a host"),
        ({"url": "http://127.0.0.1:port/x"}, "notify[0].url", "Port could not be cast"),
        ({"events": []}, "notify[0].events", "events is empty"),
        ({"min_backoff_s": 5, "max_backoff_s": 1}, "notify[0]", "above max_backoff_s"),
        ({"timeout_s": 0}, "notify[0].timeout_s", "greater than 0"),
        ({"batch_size": 0}, "notify[0].batch_size", "greater than or equal to 1"),
        ({"secret": "inline"}, "notify[0].secret", "Extra inputs are not permitted"),
    ],
)
def test_a_bad_entry_is_refused_by_key(
    tmp_path: Path, hook: dict[str, Any], key: str, says: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(tmp_path, **hook)
    assert caught.value.key == key
    assert says in str(caught.value)
    assert str(caught.value).startswith(f"gpusm.yaml: {key}: ")


def test_a_missing_secret_file_is_refused_by_key(tmp_path: Path) -> None:
    doc = {"notify": [{"url": "http://127.0.0.1:9/hook"}]}
    with pytest.raises(ConfigError) as caught:
        parse_config(doc, source="gpusm.yaml", base=tmp_path)
    assert caught.value.key == "notify[0].secret_file"


def test_two_webhooks_with_one_name_are_refused(tmp_path: Path) -> None:
    hook = {"url": "http://127.0.0.1:9/a", "secret_file": "s", "name": "ops"}
    doc = {"notify": [hook, {**hook, "url": "http://127.0.0.1:9/b"}]}
    with pytest.raises(ConfigError, match="both named 'ops'") as caught:
        parse_config(doc, source="gpusm.yaml", base=tmp_path)
    assert caught.value.key == "notify"


@pytest.mark.parametrize("content", [None, b"  \n"])
def test_an_unreadable_or_empty_secret_stops_the_daemon_with_a_clear_error(
    tmp_path: Path, content: bytes | None
) -> None:
    if content is not None:
        (tmp_path / "hook.secret").write_bytes(content)
    config = parse(tmp_path).model_copy(update={"state_dir": tmp_path / "state"})
    with pytest.raises(ConfigError) as caught:
        open_notifier(config)
    assert caught.value.key == "notify[0].secret_file"
    assert str(tmp_path / "hook.secret") in str(caught.value)
    assert "openssl rand -hex 32" in caught.value.fix
    assert not (tmp_path / "state").exists(), "nothing opened before the secret was read"


def test_without_webhooks_there_is_no_notifier(tmp_path: Path) -> None:
    assert open_notifier(parse_config({}, base=tmp_path)) is None
