"""A wheel carries the migrations: `gpusm db upgrade|current` work the same from it and a checkout.

The slow test builds the wheel from a copy of the working tree (offline, with the
venv's setuptools), installs it without dependencies into a fresh virtual environment
outside the repository, lends it this venv's dependencies through a ``.pth`` file,
and runs its ``gpusm`` from a folder outside the repository.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from typer.testing import CliRunner

from gpusm.cli.main import app
from gpusm.store import schema
from gpusm.store.schema import SCHEMA_REVISION, metadata

ROOT = Path(__file__).resolve().parents[2]
HEAD = ScriptDirectory(str(ROOT / "migrations")).get_current_head()
# What a wheel is built from: pyproject.toml's packaging and what it names.
_SOURCES = ("pyproject.toml", "README.md", "MANIFEST.in", "alembic.ini", "gpusm", "migrations")


def write_config(folder: Path, database: Path | None = None) -> Path:
    """A config on the simulated GPU with one service (never started here)."""
    doc = {
        "state_dir": str(folder / "state"),
        "gpu": {"backend": "sim"},
        "services": {
            "tts": {
                "command": ["{python}", "-m", "gpusm", "sim", "service", "--port", "18655"],
                "vram_mib": 1024,
                "health": {"http": "http://127.0.0.1:18655/health"},
            }
        },
    }
    if database is not None:
        doc["database"] = f"sqlite:///{database}"
    path = folder / "gpusm.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def revision_of(db: Path) -> str:
    raw = sqlite3.connect(db)
    try:
        return str(raw.execute("SELECT version_num FROM alembic_version").fetchone()[0])
    finally:
        raw.close()


def differences(db: Path) -> list[object]:
    engine = create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), metadata))
    finally:
        engine.dispose()


def migrate_checkout_to(db: Path, revision: str) -> None:
    """Run the checkout's migrations up to ``revision`` (no alembic.ini: no logging setup)."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", f"sqlite:///{db}")
    command.upgrade(config, revision)


# ---------------------------------------------------------------- packaging, fast
def test_every_subpackage_is_listed_for_the_wheel() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "gpusm").rglob("__init__.py")
    }
    missing = sorted(on_disk - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    assert "gpusm.store.migrations" in listed


def test_a_checkout_uses_the_top_level_migrations_beside_alembic_ini() -> None:
    assert schema.MIGRATIONS_DIR == ROOT / "migrations"
    assert (ROOT / "alembic.ini").read_text().count("script_location = %(here)s/migrations") == 1


# ---------------------------------------------------------------- db current, fast
def test_db_current_says_a_missing_database_is_missing_and_how_to_create_it(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path)
    result = CliRunner().invoke(app, ["db", "current", "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert "does not exist yet" in result.stdout
    assert f"gpusm db upgrade -c {config}" in result.stdout
    assert not (tmp_path / "state" / "gpusm.db").exists(), "asking must not create it"


def test_db_current_names_the_revision_and_whether_it_is_the_newest(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    db = tmp_path / "state" / "gpusm.db"
    upgraded = CliRunner().invoke(app, ["db", "upgrade", "-c", str(config)])
    assert upgraded.exit_code == 0, upgraded.output
    newest = CliRunner().invoke(app, ["db", "current", "-c", str(config)])
    assert newest.exit_code == 0, newest.output
    assert f"schema revision {SCHEMA_REVISION} (newest)" in newest.stdout
    raw = sqlite3.connect(db)
    with raw:
        raw.execute("UPDATE alembic_version SET version_num = '0000'")
    raw.close()
    old = CliRunner().invoke(app, ["db", "current", "-c", str(config)])
    assert old.exit_code == 0, old.output
    assert f"schema revision 0000, not the newest ({SCHEMA_REVISION})" in old.stdout
    assert "gpusm db upgrade -c" in old.stdout
    assert revision_of(db) == "0000", "asking must not migrate"


def test_db_current_on_a_broken_database_exits_1_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "gpusm.db").write_bytes(b"not a database at all" * 100)
    result = CliRunner().invoke(app, ["db", "current", "-c", str(config)])
    assert result.exit_code == 1
    assert "not a database" in result.stderr
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- the wheel, slow
def _can_build_wheels() -> str | None:
    """None if this venv's setuptools can build a wheel offline, else why not."""
    import setuptools

    major, minor = (int(p) for p in setuptools.__version__.split(".")[:2])
    if (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None:
        return None
    return (
        f"setuptools {setuptools.__version__} needs the `wheel` package (pip install -e '.[dev]')"
    )


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the built wheel, a fresh venv outside the repo with only that wheel installed)."""
    why = _can_build_wheels()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must build the wheel offline: {why}")
        pytest.skip(why)
    work = tmp_path_factory.mktemp("wheel")
    assert not work.is_relative_to(ROOT)
    source = work / "src"
    for name in _SOURCES:
        origin = ROOT / name
        if origin.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(origin, source / name, ignore=ignore)
        elif origin.exists():
            source.mkdir(exist_ok=True)
            shutil.copy2(origin, source / name)
    dist = work / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    offline = ["--no-deps", "--no-build-isolation", "--no-index"]
    built = subprocess.run(
        [*pip, "wheel", *offline, "-w", str(dist), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("gpusm-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # The dependencies come from this venv. A path line in a .pth file only extends
    # sys.path (the .pth files over there, such as the editable install's finder, are not
    # run), and it comes after the venv's own site-packages, so the wheel's gpusm wins.
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_gpusm_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    return wheel, venv


def _run(venv: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUSM_", "PYTHON"))}
    env.pop("COVERAGE_PROCESS_START", None)
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.slow
def test_the_wheel_carries_every_migration_script(wheel_venv: tuple[Path, Path]) -> None:
    wheel, _ = wheel_venv
    names = set(zipfile.ZipFile(wheel).namelist())
    scripts = [
        p.relative_to(ROOT / "migrations").as_posix()
        for p in (ROOT / "migrations").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert "versions/0001_initial.py" in scripts
    missing = [s for s in scripts if f"gpusm/store/migrations/{s}" not in names]
    assert not missing, f"the wheel lacks migration scripts: {missing}"
    modules = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "gpusm").rglob("*.py")
        if "__pycache__" not in p.parts
    ]
    assert not [m for m in modules if m not in names], "the wheel lacks modules"
    assert not [n for n in names if n.startswith("migrations/")], "no top-level migrations"


@pytest.mark.slow
def test_the_installed_wheel_finds_its_own_migrations(
    wheel_venv: tuple[Path, Path], tmp_path: Path
) -> None:
    _, venv = wheel_venv
    probe = "import gpusm, gpusm.store.schema as s; print(gpusm.__file__); print(s.MIGRATIONS_DIR)"
    found = _run(venv, [str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    package, migrations = (Path(line) for line in found.stdout.split())
    assert package.resolve().is_relative_to(venv.resolve()), "gpusm must come from the wheel"
    assert not package.resolve().is_relative_to(ROOT)
    assert migrations.resolve() == (package.parent / "store" / "migrations").resolve()
    assert (migrations / "versions" / "0001_initial.py").is_file()


@pytest.mark.slow
def test_db_upgrade_from_the_wheel_migrates_a_revision_0001_database(
    wheel_venv: tuple[Path, Path], tmp_path: Path
) -> None:
    _, venv = wheel_venv
    db = tmp_path / "old.db"
    migrate_checkout_to(db, "0001")
    config = write_config(tmp_path, database=db)
    gpusm = str(venv / "bin" / "gpusm")
    upgraded = _run(venv, [gpusm, "db", "upgrade", "-c", str(config)], cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert f"schema revision {HEAD} (newest)" in upgraded.stdout
    current = _run(venv, [gpusm, "db", "current", "-c", "gpusm.yaml"], cwd=tmp_path)
    assert current.returncode == 0, current.stdout + current.stderr
    assert f"schema revision {HEAD} (newest)" in current.stdout
    assert revision_of(db) == HEAD
    assert differences(db) == []


@pytest.mark.slow
def test_db_upgrade_from_the_wheel_builds_an_empty_database_through_alembic(
    wheel_venv: tuple[Path, Path], tmp_path: Path
) -> None:
    _, venv = wheel_venv
    config = write_config(tmp_path)
    # The same `gpusm db upgrade`, with the fallback that creates the tables and stamps
    # the revision (used only without migration scripts) made to fail.
    script = (
        "import sys\n"
        "from gpusm.store import schema\n"
        "def refuse(*args, **kwargs):\n"
        "    raise SystemExit('stamped instead of migrated')\n"
        "schema.metadata.create_all = refuse\n"
        "from gpusm.cli.main import main\n"
        f"sys.argv = ['gpusm', 'db', 'upgrade', '-c', {str(config)!r}]\n"
        "main()\n"
    )
    upgraded = _run(venv, [str(venv / "bin" / "python"), "-c", script], cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert f"schema revision {HEAD} (newest)" in upgraded.stdout
    db = tmp_path / "state" / "gpusm.db"
    assert revision_of(db) == HEAD
    assert differences(db) == []
    current = _run(
        venv, [str(venv / "bin" / "gpusm"), "db", "current", "-c", str(config)], tmp_path
    )
    assert current.returncode == 0, current.stdout + current.stderr
    assert f"schema revision {HEAD} (newest)" in current.stdout


@pytest.mark.slow
def test_the_wheel_carries_the_dashboard_files(wheel_venv: tuple[Path, Path]) -> None:
    wheel, _ = wheel_venv
    names = set(zipfile.ZipFile(wheel).namelist())
    static = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "gpusm" / "api" / "static").rglob("*")
        if p.is_file()
    ]
    assert "gpusm/api/static/index.html" in static
    assert "gpusm/api/static/vendor/uplot-1.6.32/LICENSE" in static
    missing = [s for s in static if s not in names]
    assert not missing, f"the wheel lacks dashboard files (pyproject package-data): {missing}"
