"""Bad input of every kind ends in one ``error:`` line and exit code 2: never a traceback.

One example per class of mistake first, then a property test that feeds generated
names, keys, paths and times (brackets, control characters, unicode, very long
strings) through every command's error path. All in-process through the real ``gpusm``
app (``gpusm.cli.main``), without a daemon: each command refuses before it would start
anything.
"""

from __future__ import annotations

import re
import subprocess
import sys
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner, Result

from gpusm.cli.common import CLIENT_PATTERN, fail, friendly_errors, plain, say
from gpusm.cli.main import app
from gpusm.config import NativeServiceConfig, split_listen
from gpusm.errors import ConfigError, GpusmError, UnknownName
from tests.support.ports import free_port

# The CLI runs in this process: nothing from the developer's shell may choose a config.
RUNNER = CliRunner(env={"GPUSM_CONFIG": None, "GPUSM_SIM_DIR": None, "COLUMNS": "120"})
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # gpusm.config's Name


def good_doc(root: Path) -> dict[str, Any]:
    return {
        "state_dir": str(root / "state"),
        "gpu": {"backend": "sim", "reserve_mib": 0, "sim": {"total_mib": 4096}},
        "services": {
            "tts": {
                "command": ["sleep", "100"],
                "vram_mib": 1000,
                "health": {"tcp": f"127.0.0.1:{free_port()}"},
            }
        },
        "phases": {"speak": ["tts"]},
        "api": {"listen": f"127.0.0.1:{free_port()}"},
    }


def write(path: Path, doc: object) -> Path:
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a good config (``good.yaml``) and a regular file (``blocker``)."""
    folder = tmp_path_factory.mktemp("bad-input")
    write(folder / "good.yaml", good_doc(folder))
    (folder / "blocker").write_text("a file, not a folder\n")
    return folder


def gpusm(*args: str) -> Result:
    return RUNNER.invoke(app, list(args))


def assert_refused(result: Result, *expected: str) -> str:
    """Exit 2, exactly one ``error:`` line on stderr, no traceback; returns that line."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.output
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    # Nothing the user typed can restyle the terminal or forge another line.
    assert not any(unicodedata.category(ch) == "Cc" for ch in result.stderr.replace("\n", ""))
    for text in expected:
        assert text in errors[0], (text, errors[0])
    return errors[0]


# ---------------------------------------------------------------- 1: text is never markup
def test_square_brackets_in_messages_are_printed_as_written(root: Path) -> None:
    no_command = write(
        root / "no-command.yaml",
        {"services": {"tts": {"vram_mib": 1, "health": {"tcp": "127.0.0.1:1"}}}},
    )
    assert_refused(gpusm("config", "check", str(no_command)), "command: [program, args...]")
    # "[/]" closes nothing: read as markup it raised MarkupError, a traceback.
    good = str(root / "good.yaml")
    for name in ("[/]", "[bold]x[/bold]", "[red]", "a[b]c"):
        assert_refused(gpusm("phase", "-c", good, "--", name), f"unknown phase {name!r}")
    missing = root / "[nope]" / "cfg[1].yaml"
    assert_refused(gpusm("config", "check", str(missing)), f"{missing}: file not found")


def test_control_characters_are_escaped_and_cannot_forge_a_line(root: Path) -> None:
    name = "x\x1b[31m\nerror: forged\u2028\x00"
    line = assert_refused(gpusm("start", "-c", str(root / "good.yaml"), "--", name))
    assert "\\x1b[31m" in line


def test_the_one_printer_keeps_user_text_literal(capsys: pytest.CaptureFixture[str]) -> None:
    say("[bold]not bold[/] [#####.....] :smile: \x1b[2J")
    say("to stderr [x]", err=True)
    with pytest.raises(typer.Exit) as exit_:
        fail("[/] closes nothing\nsecond line", 2)
    assert exit_.value.exit_code == 2
    out, err = capsys.readouterr()
    assert out == "[bold]not bold[/] [#####.....] :smile: \\x1b[2J\n"
    assert err == "to stderr [x]\nerror: [/] closes nothing\\nsecond line\n"
    assert plain("a\tb\nc").plain == "a\tb\nc"  # tabs and newlines of multi-line text stay


def test_the_demo_view_shows_the_vram_bar_and_names_literally() -> None:
    from gpusm.cli.demo_cmd import _view

    device = SimpleNamespace(used_mib=12288, total_mib=24576)
    service = SimpleNamespace(name="tts", state="healthy", used_mib=4096, priority=1, pid=7)
    status = SimpleNamespace(devices=[device], services=[service])
    coordinator: Any = SimpleNamespace(status=lambda: status)
    console = Console(record=True, width=120, color_system=None)
    console.print(_view(1, 2, "[video]", coordinator))
    text = "".join(console.export_text().split())  # the title may wrap at the table's width
    assert "phase[video]" in text
    assert "VRAM[" + "#" * 20 + "." * 20 + "]12288/24576MiB" in text


# ---------------------------------------------------------------- 2: an empty config
def test_an_empty_config_is_refused_wherever_services_are_needed(root: Path) -> None:
    empty = write(root / "empty.yaml", "")
    message = "the file defines no services. Fix: add services: (see examples/sim-demo.yaml)"
    for args in (
        ["config", "check", str(empty)],
        ["status", "-c", str(empty)],
        ["phase", "speak", "-c", str(empty)],
        ["events", "-c", str(empty)],
    ):
        assert_refused(gpusm(*args), f"{empty}: {message}")
    only_gpu = write(root / "only-gpu.yaml", {"gpu": {"backend": "sim"}})
    assert_refused(gpusm("config", "check", str(only_gpu)), f"{only_gpu}: {message}")
    assert_refused(gpusm("plan", "speak", "-c", str(only_gpu)), message)


# ---------------------------------------------------------------- 3: config check = later refusals
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"api": {"listen": "nonsense"}}, "api.listen: 'nonsense' is not HOST:PORT"),
        ({"api": {"listen": "127.0.0.1:70000"}}, "api.listen: '127.0.0.1:70000' is not"),
        ({"state_dir": "{root}/blocker/state"}, "state_dir: cannot create or write the folder"),
        ({"database": "sqlite:///{root}/blocker/db/x.db"}, "database: cannot create or write"),
        ({"database": "postgresql://db/gpusm"}, "database: 'postgresql://db/gpusm' is not"),
        ({"gpu": {"backend": "sim", "sim": {"dir": "{root}/blocker/sim"}}}, "gpu.sim.dir: "),
        ({"api": {"token_file": "{root}/blocker/token"}}, "api.token_file: cannot create"),
    ],
)
def test_config_check_refuses_what_a_later_command_would(
    root: Path, change: dict[str, Any], expected: str
) -> None:
    doc = {**good_doc(root), **yaml.safe_load(yaml.safe_dump(change).replace("{root}", str(root)))}
    path = write(root / "later.yaml", doc)
    assert_refused(gpusm("config", "check", str(path)), f"{path}: {expected}")


def test_config_check_of_a_good_file_still_passes_and_creates_nothing(tmp_path: Path) -> None:
    path = write(tmp_path / "[good].yaml", good_doc(tmp_path))
    result = gpusm("config", "check", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"OK: {path}\n")
    assert "services: tts (native, 1000 MiB, priority 0)" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["[good].yaml"]


# ---------------------------------------------------------------- 4: an unusable state dir
def test_a_state_dir_that_cannot_be_created_is_exit_2_for_every_command(root: Path) -> None:
    doc = {**good_doc(root), "state_dir": str(root / "blocker" / "state")}
    path = write(root / "blocked.yaml", doc)
    expected = f"cannot create or write the folder {root / 'blocker' / 'state'}"
    for args in (
        ["status"],
        ["stop", "tts"],
        ["plan", "speak"],
        ["release", "--all"],
        ["events"],
        ["history", "tts"],
    ):
        line = assert_refused(gpusm(*args, "-c", str(path)), expected)
        assert f"({root / 'blocker'} is a file, not a folder)" in line, args


def test_the_lock_turns_os_errors_on_the_state_dir_into_config_errors(tmp_path: Path) -> None:
    from gpusm.lock import StateDirLock

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^state_dir: cannot create or write the folder"):
        StateDirLock(tmp_path / "file" / "state").acquire()
    (tmp_path / "dir" / "coordinator.lock").mkdir(parents=True)  # the lock file is a folder
    with pytest.raises(ConfigError, match=r"^state_dir: cannot create or write .*coordinator"):
        StateDirLock(tmp_path / "dir").acquire()


# ---------------------------------------------------------------- 5: times out of range
@pytest.mark.parametrize(
    "value",
    [
        "9999-99-99",
        "99999-01-01",
        "-1",
        "",
        "0001-01-01T00:00+01:00",  # before year 1 in UTC
        "9999-12-31T23:59:59-01:00",  # after year 9999 in UTC
        "2026-02-30",
        "[2026]",
    ],
)
def test_an_out_of_range_or_bad_time_is_exit_2(root: Path, value: str) -> None:
    good = str(root / "good.yaml")
    assert_refused(gpusm("events", "-c", good, f"--since={value}"), "--since: ")
    assert_refused(gpusm("events", "-c", good, f"--until={value}"), "--until: ")


def test_times_at_the_ends_of_the_calendar_still_work(root: Path) -> None:
    good = str(root / "good.yaml")
    for value in ("0001-01-01", "9999-12-31T23:59:59.999999Z", "2026-01-31T12:00:00+14:00"):
        result = gpusm("events", "-c", good, f"--since={value}", "--json")
        assert result.exit_code == 0, (value, result.output)


# ---------------------------------------------------------------- 6: bad input exits 2
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["phase", "nope"], "unknown phase 'nope'; known: speak"),
        (["plan", "nope"], "unknown phase 'nope'"),
        (["start", "nope"], "unknown service 'nope'; known: tts"),
        (["stop", "nope"], "unknown service 'nope'"),
        (["reset", "nope"], "unknown service 'nope'"),
        (["history", "nope"], "unknown service 'nope'"),
        (["phase", "speak", "--client", "bad client"], "--client: 'bad client' is not a client"),
        (["plan", "speak", "--client", "-x"], "--client: '-x' is not a client id"),
        (["release", "--client", "x" * 200], "--client: "),
        (["release", "--all", "--client", "w1"], "give --client C or --all, not both"),
    ],
)
def test_bad_names_and_options_exit_2(root: Path, args: list[str], expected: str) -> None:
    assert_refused(gpusm(*args, "-c", str(root / "good.yaml")), expected)


@pytest.mark.parametrize(
    "args",
    [
        ["phase", "speak", "--priority", str(10**12)],
        ["plan", "speak", "--priority", str(-(10**12))],
        ["phase", "speak", "--timeout", "1e9"],
        ["start", "tts", "--timeout", "0"],
    ],
)
def test_options_out_of_the_apis_range_are_usage_errors(root: Path, args: list[str]) -> None:
    # Refused alike in-process and through a daemon (whose API would answer 422).
    result = gpusm(*args, "-c", str(root / "good.yaml"))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_the_cli_accepts_exactly_the_apis_client_names() -> None:
    from pydantic import TypeAdapter

    from gpusm.api.schemas import ClientName

    assert TypeAdapter(ClientName).json_schema()["pattern"] == CLIENT_PATTERN


def test_friendly_errors_maps_each_kind_of_error_to_its_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cases: list[tuple[BaseException, int]] = [
        (ConfigError("f.yaml", "k", "bad", "fix it"), 2),
        (UnknownName("phase", "[x]", ["a"]), 2),
        (GpusmError("the operation failed"), 1),
        (PermissionError(13, "Permission denied", "/x/[y]"), 1),
    ]
    for error, code in cases:
        with pytest.raises(typer.Exit) as exit_, friendly_errors():
            raise error
        assert exit_.value.exit_code == code, error
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "error: f.yaml: k: bad. Fix: fix it",
        "error: unknown phase '[x]'; known: a",
        "error: the operation failed",
        "error: Permission denied (/x/[y])",
    ]


@pytest.mark.parametrize("option", ["-c", "--sim-dir"])
def test_a_nul_in_a_path_option_is_a_usage_error(root: Path, option: str) -> None:
    result = gpusm("sim", "status", option, f"{root}/a\x00b")
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert "embedded null byte" in result.stderr
    assert "Traceback" not in result.output


def test_a_bad_sim_hog_is_exit_2_in_a_real_process(tmp_path: Path) -> None:
    # hog installs signal handlers, so it runs in its own process.
    proc = subprocess.run(
        [sys.executable, "-m", "gpusm", "sim", "hog", "--mib", "1", "--sim-dir", "[no]\x01sim"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "120"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "error: no simulated GPU at [no]\\x01sim; create it with `gpusm sim create "
        "--total-mib N` (or pass --total-mib N)"
    ]


# ---------------------------------------------------------------- 8: generated input
SPECIAL = [
    "[",
    "]",
    "[/]",
    "[bold red]x[/]",
    "[link=http://x]y",
    ":smile:",
    "\x1b[31mred",
    "a\nerror: forged",
    "\r\t\x0b\x0c\x85\u2028\u2029",
    "\x00",
    "\u202eevil",
    "名前-🚀",
    "e\u0301",
    "x" * 5000,
    "-",
    "--",
    "",
    " ",
]
TEXT = st.one_of(
    st.sampled_from(SPECIAL),
    st.text(max_size=40),
    st.text(min_size=300, max_size=3000),
    st.lists(st.sampled_from(SPECIAL), min_size=2, max_size=5).map("".join),
)
EXAMPLES = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
UNUSABLE_TIME = st.one_of(
    TEXT,
    st.builds(
        "{:04d}-{:02d}-{:02d}{}".format,
        st.integers(0, 99999),
        st.integers(0, 99),
        st.integers(0, 99),
        st.sampled_from(["", "T24:00", "T00:00+01:00", "T23:59-01:00", "Z", "[x]"]),
    ),
    st.sampled_from(["0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59.999999-00:01"]),
)


def usable_time(value: str) -> bool:
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is not None:
            parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        return False
    return True


def refused(args: Sequence[str], *expected: str) -> None:
    assert_refused(gpusm(*args), *expected)


@pytest.fixture(scope="module")
def good(root: Path) -> str:
    return str(root / "good.yaml")


@EXAMPLES
@given(name=TEXT.filter(lambda n: n not in ("tts", "speak")))
@pytest.mark.parametrize("command", ["phase", "plan", "start", "stop", "reset", "history"])
def test_any_unknown_name_is_refused(good: str, command: str, name: str) -> None:
    refused([command, "-c", good, "--", name], "unknown ")


@EXAMPLES
@given(client=TEXT.filter(lambda c: re.fullmatch(CLIENT_PATTERN, c) is None))
@pytest.mark.parametrize("command", [["phase", "speak"], ["plan", "speak"], ["release"]])
def test_any_bad_client_is_refused(good: str, command: list[str], client: str) -> None:
    refused([*command, "-c", good, f"--client={client}"], "--client: ")


@EXAMPLES
@given(
    value=UNUSABLE_TIME.filter(lambda v: not usable_time(v)),
    option=st.sampled_from(["since", "until"]),
)
def test_any_unusable_time_is_refused(good: str, value: str, option: str) -> None:
    refused(["events", "-c", good, f"--{option}={value}"], f"--{option}: ")


# A path option is a Click Path: a NUL in it (which no real argv can carry) is Click's usage
# error, exit 2 (test_a_nul_in_a_path_option_is_a_usage_error); gpusm's own checks see the rest.
PATH_PART = TEXT.map(lambda text: text.replace("\x00", ""))


@EXAMPLES
@given(name=PATH_PART, command=st.sampled_from(["status", "events", "config check", "plan speak"]))
def test_any_missing_config_path_is_refused(root: Path, name: str, command: str) -> None:
    path = f"{root}/no-such-folder/{name}"
    refused([*command.split(), "-c", path], "error: ")


def mutations(root: Path) -> st.SearchStrategy[dict[str, Any]]:
    """The good config with one generated mistake in it."""
    good = good_doc(root)

    def with_key(where: str, key: str) -> dict[str, Any]:
        doc: dict[str, Any] = yaml.safe_load(yaml.safe_dump(good))
        node = doc
        for part in where.split(".") if where else []:
            node = node[part]
        node[key] = 1
        return doc

    fields = set(NativeServiceConfig.model_fields)
    known = {"state_dir", "database", "gpu", "services", "phases", "pipeline", "api", "source"}
    bad_name = TEXT.filter(lambda n: NAME.fullmatch(n) is None)
    return st.one_of(
        st.builds(with_key, st.just(""), TEXT.filter(lambda k: k not in known)),
        st.builds(with_key, st.just("services.tts"), TEXT.filter(lambda k: k not in fields)),
        bad_name.map(lambda n: {**good, "services": {n: good["services"]["tts"]}}),
        bad_name.map(lambda n: {**good, "phases": {n: ["tts"]}}),
        TEXT.filter(lambda n: n != "tts").map(lambda n: {**good, "phases": {"p": [n]}}),
        TEXT.filter(lambda n: n != "speak").map(lambda n: {**good, "pipeline": [n]}),
        TEXT.filter(lambda v: split_listen(v) is None).map(
            lambda v: {**good, "api": {"listen": v}}
        ),
        TEXT.map(lambda n: {**good, "state_dir": f"{root}/blocker/{n}"}),
        TEXT.map(lambda n: {**good, "database": n}).filter(
            lambda d: not str(d["database"]).startswith("sqlite")
        ),
    )


@EXAMPLES
@given(data=st.data())
def test_any_bad_config_file_is_refused_by_config_check(root: Path, data: st.DataObject) -> None:
    content = data.draw(st.one_of(TEXT, mutations(root)))
    path = root / "generated.yaml"
    if isinstance(content, str):
        path.write_bytes(content.encode("utf-8", "surrogatepass"))
    else:
        write(path, content)
    refused(["config", "check", str(path)], f"{path}: ")


@EXAMPLES
@given(
    name=PATH_PART,
    command=st.sampled_from(
        [
            ["sim", "status"],
            ["sim", "reset"],
            ["sim", "create"],
            ["sim", "status", "--total-mib", "64"],
            ["sim", "service", "--vram-mib", "1", "--port", "1"],
        ]
    ),
)
def test_any_unusable_sim_dir_is_refused(root: Path, name: str, command: list[str]) -> None:
    # Below a regular file: no such simulated GPU, and none can be created there.
    refused([*command, f"--sim-dir={root}/blocker/{name}"], "error: ")
