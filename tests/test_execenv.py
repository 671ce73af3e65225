"""privsock.execenv, the pure parts: the clean environment, variable names,
and the command lookup judged by this process's own credentials."""

from __future__ import annotations

from pathlib import Path

import pytest

from privsock.dropall import Target
from privsock.execenv import (
    SAFE_PATH,
    check_env_name,
    clean_environment,
    lookup,
    parse_setenv,
)
from privsock.helper.exitcodes import Refusal

TARGET = Target("web", 1001, 1001, "/srv/web", "/bin/sh")


def test_clean_environment_keeps_only_the_safe_defaults_and_the_locale() -> None:
    inherited = {
        "PATH": "/root/bin:/usr/bin", "HOME": "/root", "USER": "root", "SECRET": "s",
        "TERM": "xterm", "LANG": "de_DE.UTF-8", "LC_ALL": "C", "LD_PRELOAD": "x.so",
        "LISTEN_FDS": "9", "LCX": "not a locale variable",
    }  # fmt: skip
    assert clean_environment(TARGET, inherited) == {
        "PATH": SAFE_PATH, "HOME": "/srv/web", "USER": "web", "LOGNAME": "web",
        "SHELL": "/bin/sh", "TERM": "xterm", "LANG": "de_DE.UTF-8", "LC_ALL": "C",
    }  # fmt: skip


def test_keep_passes_what_is_set_and_setenv_wins() -> None:
    env = clean_environment(
        TARGET, {"A": "1", "PATH": "/opt/bin"},
        keep=["A", "B", "PATH"], setenv=[("A", "2"), ("C", "")],
    )  # fmt: skip
    assert env["A"] == "2"
    assert env["C"] == ""
    assert env["PATH"] == "/opt/bin"  # kept by name, on purpose
    assert "B" not in env


@pytest.mark.parametrize("name", ["", "1A", "A-B", "A B", "A=B", "É", "LISTEN_FDS",
                                  "LISTEN_PID", "LISTEN_FDNAMES"])  # fmt: skip
def test_check_env_name_refuses(name: str) -> None:
    with pytest.raises(ValueError):
        check_env_name(name)


def test_parse_setenv() -> None:
    assert parse_setenv("A=b=c") == ("A", "b=c")
    assert parse_setenv("_A1=") == ("_A1", "")
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_setenv("A")


def test_lookup_finds_the_first_executable_in_the_path(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "srv").write_text("")  # not executable: skipped, as execvp does
    (second / "srv").write_text("")
    (second / "srv").chmod(0o755)
    assert lookup("srv", f"{first}:relative:{second}", "web") == str(second / "srv")


@pytest.mark.parametrize(
    ("make", "code", "message"),
    [
        ("none", 127, "command not found: 'srv' (searched PATH {d})"),
        ("plain", 126, "{d}/srv: not executable by web"),
        ("dir", 126, "{d}/srv: is a directory"),
    ],
)
def test_lookup_says_why_and_names_the_path(
    tmp_path: Path, make: str, code: int, message: str
) -> None:
    if make == "plain":
        (tmp_path / "srv").write_text("")
    elif make == "dir":
        (tmp_path / "srv").mkdir()
    with pytest.raises(Refusal) as info:
        lookup("srv", str(tmp_path), "web")
    assert info.value.exit_code == code
    assert str(info.value) == message.format(d=tmp_path)


def test_lookup_does_not_search_for_a_path(tmp_path: Path) -> None:
    with pytest.raises(Refusal, match="no such file"):
        lookup(f"{tmp_path}/srv", "/usr/bin", "web")
    assert lookup("/bin/sh", "", "web") == "/bin/sh"
