"""The man pages document every option the commands accept: each option of
`privsock --help` and of every subcommand's --help appears in privsock(1),
and the helper's usage line in privsock-helper(8)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from privsock import __version__, cli
from privsock.cli import build_parser
from privsock.helper.exitcodes import Exit
from privsock.helper.main import USAGE

from .conftest import REPO

MAN = REPO / "docs" / "man"


def _roff(text: str) -> str:
    """What a word looks like in the roff source: hyphens are escaped."""
    return text.replace("-", r"\-")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [opt for action in parser._actions for opt in action.option_strings]


def test_every_privsock_option_is_in_the_man_page() -> None:
    page = (MAN / "privsock.1").read_text()
    parser = build_parser()
    missing = [f"privsock {opt}" for opt in _options(parser) if _roff(opt) not in page]
    for name, sub in _subcommands(parser).items():
        if not re.search(rf"^\.SS {re.escape(_roff(name))}$", page, re.MULTILINE):
            missing.append(f"privsock {name} (no .SS {_roff(name)} section)")
        missing += [f"privsock {name} {opt}" for opt in _options(sub)
                    if opt not in ("-h", "--help") and _roff(opt) not in page]  # fmt: skip
    assert missing == [], (
        "undocumented in docs/man/privsock.1 (add each to its command's section): "
        + ", ".join(missing)
    )


def test_the_helper_man_page_has_its_usage() -> None:
    page = (MAN / "privsock-helper.8").read_text()
    options = re.findall(r"--[a-z-]+", USAGE)
    assert options, USAGE
    for opt in options:
        assert _roff(opt) in page, f"privsock-helper {opt} is undocumented in privsock-helper.8"


def test_man_pages_carry_the_version() -> None:
    for page in ("privsock.1", "privsock-helper.8"):
        header = (MAN / page).read_text().split("\n.TH ", 1)[1].splitlines()[0]
        assert f'"privsock {__version__}"' in header, f"{page}: {header}"


def test_version() -> None:
    main = "from privsock.cli import main; main()"
    done = subprocess.run([sys.executable, "-I", "-c", main, "--version"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert (done.returncode, done.stdout) == (0, f"privsock {__version__}\n")


@pytest.mark.parametrize(
    "argv",
    [["exec", "--user", "nobody", "--listen", "tcp:127.0.0.1:80", "--", "true"],
     ["check-policy"]],
)  # fmt: skip
def test_the_default_policy_is_the_packages(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.DEFAULT_POLICY == "/etc/privsock/policy.toml"
    missing = str(tmp_path / "policy.toml")
    monkeypatch.setattr(cli, "DEFAULT_POLICY", missing)
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == Exit.NOINPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"no policy at {missing} (the default)" in err
    assert "--policy FILE" in err
