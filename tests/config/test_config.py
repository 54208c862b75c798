"""The config file: defaults, path resolution, and a clear message for every kind of mistake."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from gpusm.config import (
    check_folders,
    find_config_path,
    folder_problem,
    load_config,
    make_folder,
    parse_config,
    require_services,
    split_listen,
    sqlite_file,
)
from gpusm.errors import ConfigError, UnknownName

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

GOOD = {
    "state_dir": "./st",
    "gpu": {"backend": "sim", "sim": {"total_mib": 24576}},
    "services": {
        "tts": {
            "command": ["{python}", "-m", "tts"],
            "vram_mib": 4096,
            "priority": 50,
            "health": {"http": "http://127.0.0.1:5000/health"},
        },
        "llm": {
            "runtime": "docker",
            "image": "ollama:local",
            "ports": ["11434:11434"],
            "vram_mib": 8192,
            "health": {"tcp": "127.0.0.1:11434"},
        },
    },
    "phases": {"speak": ["tts"], "think": {"services": ["llm"]}, "idle": None},
    "pipeline": ["speak", "think"],
}


def write(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "gpusm.yaml"
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return path


def with_change(path: str, value: object) -> dict[str, object]:
    """A deep copy of GOOD with the dotted key set to value (None deletes it)."""
    doc = yaml.safe_load(yaml.safe_dump(GOOD))
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return doc  # type: ignore[no-any-return]


def test_examples_are_valid() -> None:
    for name in ("mcn-rtx4090.yaml", "sim-demo.yaml"):
        config = load_config(EXAMPLES / name)
        assert set(config.services) == {"comfyui", "cosyvoice", "vidi", "ollama"}
        assert config.pipeline == ["crawl", "analysis", "tts", "video", "render"]


def test_seed_example_keeps_the_plans_sizes_and_priorities() -> None:
    config = load_config(EXAMPLES / "mcn-rtx4090.yaml")
    sizes = {n: (s.vram_mib, s.priority, s.runtime) for n, s in config.services.items()}
    assert sizes == {
        "comfyui": (20480, 100, "native"),
        "cosyvoice": (4096, 50, "docker"),
        "vidi": (4096, 40, "native"),
        "ollama": (18432, 10, "docker"),
    }


def test_relative_paths_resolve_against_the_files_folder(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.state_dir == (tmp_path / "st").resolve()
    assert config.sim_dir == config.state_dir / "simgpu"
    assert config.database_url == f"sqlite:///{config.state_dir / 'gpusm.db'}"
    assert config.token_path == config.state_dir / "api-token"


def test_phase_shorthands_and_service_names_are_filled_in(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.phase("speak").services == ["tts"]
    assert config.phase("idle").services == []
    assert config.service("llm").name == "llm"
    assert config.service("tts").host_ports() == {5000}
    assert config.service("llm").host_ports() == {11434}


def test_unknown_names_are_refused_with_the_known_ones(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    with pytest.raises(UnknownName, match="unknown phase 'nope'; known: idle, speak, think"):
        config.phase("nope")
    with pytest.raises(UnknownName, match="unknown service 'x'"):
        config.service("x")


BAD_CASES = [
    ("unknown-top-key", with_change("colour", "blue"), "colour", "remove the key"),
    (
        "unknown-service-key",
        with_change("services.tts.vrm_mib", 3),
        "services.tts.vrm_mib",
        "spelling",
    ),
    (
        "negative-size",
        with_change("services.tts.vram_mib", -5),
        "services.tts.vram_mib",
        "zero or more",
    ),
    (
        "not-a-number",
        with_change("services.tts.vram_mib", "big"),
        "services.tts.vram_mib",
        "whole number",
    ),
    (
        "missing-size",
        with_change("services.tts.vram_mib", None),
        "services.tts.vram_mib",
        "add the key",
    ),
    (
        "phase-unknown-service",
        with_change("phases.speak", ["tts", "ghost"]),
        "phases.speak.services[1]",
        "ghost",
    ),
    ("pipeline-unknown-phase", with_change("pipeline", ["speak", "sing"]), "pipeline[1]", "sing"),
    ("bad-backend", with_change("gpu.backend", "cuda"), "gpu.backend", "'nvml' or 'sim'"),
    (
        "bigger-than-gpu",
        with_change("services.llm.vram_mib", 30000),
        "services.llm.vram_mib",
        "exceeds",
    ),
    (
        "duplicate-port",
        with_change("services.tts.health", {"http": "http://127.0.0.1:11434/h"}),
        "services.",
        "port 11434",
    ),
    (
        "no-health-kind",
        with_change("services.tts.health", {"timeout_s": 3}),
        "services.tts.health",
        "exactly one",
    ),
    (
        "two-health-kinds",
        with_change("services.tts.health", {"tcp": "a:1", "http": "http://a/"}),
        "services.tts.health",
        "exactly one",
    ),
    (
        "native-without-command",
        with_change("services.tts.command", None),
        "services.tts",
        "command",
    ),
    ("docker-without-image", with_change("services.llm.image", None), "services.llm", "image"),
    ("bad-port-spec", with_change("services.llm.ports", ["eleven"]), "services.llm", "host_port"),
    (
        "bad-service-name",
        with_change("services", {"bad name!": GOOD["services"]["tts"]}),
        "services.bad name!",
        "letters",
    ),  # type: ignore[index]
    (
        "negative-timeout",
        with_change("services.tts.stop_timeout_s", -1),
        "services.tts.stop_timeout_s",
        "above zero",
    ),
    (
        "bad-restart-policy",
        with_change("services.tts.restart", {"policy": "always"}),
        "services.tts.restart.policy",
        "'no' or 'on-failure'",
    ),
    ("listen-not-host-port", with_change("api", {"listen": "nonsense"}), "api.listen", "HOST:PORT"),
    ("listen-port-too-big", with_change("api", {"listen": "[::1]:99999"}), "api.listen", "7723"),
    ("listen-unicode-digits", with_change("api", {"listen": "h:\u00b2"}), "api.listen", "HOST"),
    (
        "database-not-sqlite",
        with_change("database", "postgresql://db/gpusm"),
        "database",
        "sqlite:///PATH",
    ),
    ("database-in-memory", with_change("database", "sqlite://"), "database", "SQLite file"),
]


@pytest.mark.parametrize(
    ("doc", "key", "hint"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_bad_config_gets_one_message_naming_file_key_and_fix(
    tmp_path: Path, doc: object, key: str, hint: str
) -> None:
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}")
    assert hint in message
    assert "Fix: " in message
    assert "\n" not in message


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "services:\n  a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error at line \d+"):
        load_config(path)


def test_missing_file_says_how_to_point_at_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"file not found\. Fix: pass -c FILE"):
        load_config(tmp_path / "absent.yaml")


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("text", ["", "\n# nothing yet\n", "{}\n", "~\n"])
def test_an_empty_file_is_refused_saying_to_add_services(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: the file defines no services. Fix: add services: (see examples/sim-demo.yaml)"
    )


def test_a_mapping_without_services_parses_with_defaults() -> None:
    # Only an empty *file* is refused; require_services() is for commands that need them.
    config = parse_config({})
    assert config.services == {}
    assert config.gpu.backend == "nvml"
    assert config.gpu.settle_timeout_s == 5.0
    with pytest.raises(ConfigError, match="defines no services"):
        require_services(config)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path)  # a directory


def test_parse_config_rejects_non_mapping() -> None:
    with pytest.raises(ConfigError):
        parse_config(["x"])  # type: ignore[arg-type]


def test_config_is_found_by_flag_then_env_then_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUSM_CONFIG", raising=False)
    assert find_config_path(None) == Path("gpusm.yaml")
    monkeypatch.setenv("GPUSM_CONFIG", "/etc/gpusm.yaml")
    assert find_config_path(None) == Path("/etc/gpusm.yaml")
    assert find_config_path("mine.yaml") == Path("mine.yaml")
    assert os.environ["GPUSM_CONFIG"] == "/etc/gpusm.yaml"


def test_relative_docker_volume_resolves_against_the_file(tmp_path: Path) -> None:
    doc = with_change("services.llm.volumes", ["./models:/root/.ollama:ro", "named:/data"])
    config = load_config(write(tmp_path, doc))
    assert config.service("llm").volumes == [
        f"{tmp_path.resolve()}/models:/root/.ollama:ro",
        "named:/data",
    ]


# ---------------------------------------------------------------- what a later command needs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7723", ("127.0.0.1", 7723)),
        (" localhost:0 ", ("localhost", 0)),
        ("[::1]:8000", ("::1", 8000)),
        ("nonsense", None),
        (":80", None),
        ("[::1]", None),
        ("host:65536", None),
        ("host:-1", None),
        ("host:\u0668\u0660", None),  # Arabic-Indic digits are not a port
        ("host:" + "1" * 5000, None),  # no int() of a huge string
    ],
)
def test_split_listen_is_the_one_listen_syntax(text: str, expected: object) -> None:
    from gpusm.wire import parse_listen

    assert split_listen(text) == expected
    if expected is None:
        with pytest.raises(ConfigError, match="is not HOST:PORT"):
            parse_listen(text)
    else:
        where = parse_listen(text)
        assert (where.host, where.port) == expected


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:////abs/gpusm.db", "/abs/gpusm.db"),
        ("sqlite:///rel/gpusm.db", "rel/gpusm.db"),
        ("sqlite+pysqlite:///x.db?timeout=5", "x.db"),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("postgresql://db/gpusm", None),
        ("not a url", None),
    ],
)
def test_sqlite_file_reads_the_path_of_a_sqlite_url(url: str, path: str | None) -> None:
    assert sqlite_file(url) == (Path(path) if path else None)


def test_a_state_dir_below_a_file_is_named_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("")
    path = write(tmp_path, with_change("state_dir", "./blocker/state"))
    config = load_config(path)  # the file itself is fine: the folder is checked separately
    with pytest.raises(ConfigError) as info:
        check_folders(config)
    message = str(info.value)
    assert message.startswith(f"{path}: state_dir: cannot create or write the folder ")
    assert f"{tmp_path / 'blocker'} is a file, not a folder" in message
    assert "Fix: set state_dir to a folder that gpusm may create and write" in message
    with pytest.raises(ConfigError, match=r"^state_dir: cannot create"):
        make_folder(config.state_dir)  # no config file known: the key leads
    assert not (tmp_path / "blocker").is_dir()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("database", "sqlite:///{blocker}/db/gpusm.db"),
        ("api", {"token_file": "{blocker}/token"}),
        ("gpu", {"backend": "sim", "sim": {"dir": "{blocker}/sim"}}),
    ],
)
def test_every_folder_gpusm_writes_is_checked(tmp_path: Path, key: str, value: object) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    text = yaml.safe_dump(value).replace("{blocker}", str(blocker))
    config = load_config(write(tmp_path, with_change(key, yaml.safe_load(text))))
    expected = {"api": "api.token_file", "gpu": "gpu.sim.dir"}.get(key, key)
    with pytest.raises(ConfigError, match=rf": {expected}: cannot create"):
        check_folders(config)


def test_folder_problem_passes_creatable_folders_and_names_odd_paths(tmp_path: Path) -> None:
    assert folder_problem(tmp_path) is None
    assert folder_problem(tmp_path / "a" / "b" / "c") is None
    assert folder_problem(tmp_path / "nul\x00") == "a path cannot contain a NUL character"
    assert folder_problem(tmp_path / ("x" * 5000)) == "File name too long"
    assert make_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    with pytest.raises(ConfigError, match="NUL"):
        make_folder(tmp_path / "nul\x00", "state_dir", "gpusm.yaml")


def test_a_file_that_is_not_utf8_or_a_path_with_nul_is_a_config_error(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe services: {}")
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(binary)
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(str(tmp_path / "a\x00.yaml"))
