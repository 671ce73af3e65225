"""load_policy against real files: ownership, modes, symlinks, file types, size and encoding.

Needs root, to chown files and directories to another user. pytest's tmp_path is
root-owned and 0700 under /tmp (root-owned, sticky), so a good file there loads.
"""

from __future__ import annotations

import os
import pwd
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from privsock.helper.exitcodes import Exit, Refusal
from privsock.helper.policy_file import MAX_POLICY_BYTES, load_policy

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("root")]

GOOD = """\
version = 1
[helper]
user = "privsock"
[[allow]]
transports = ["udp"]
ports = [53]
addresses = ["127.0.0.0/8"]
"""
FILE_RULE = "it must be owned by root and writable only by root"
DIR_RULE = (
    "every directory above the policy must be owned by root and writable only by root "
    "(or sticky, like /tmp)"
)


@pytest.fixture
def privsock_uid() -> int:
    return pwd.getpwnam("privsock").pw_uid


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A FIFO or other blocking open must fail the test, not hang the suite."""

    def timeout(signum: int, frame: object) -> None:
        raise TimeoutError("load_policy blocked")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def write(path: Path, text: str | bytes = GOOD, mode: int = 0o644) -> Path:
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    path.chmod(mode)
    return path


def refused(path: Path | str) -> Refusal:
    with pytest.raises(Refusal) as caught:
        load_policy(str(path))
    assert "\n" not in str(caught.value)
    return caught.value


def test_good_file_loads(tmp_path: Path) -> None:
    policy = load_policy(str(write(tmp_path / "p.toml")))
    assert policy.user == "privsock"
    assert [r.name for r in policy.allow] == ["allow[0]"]


def test_read_only_and_private_modes_load(tmp_path: Path) -> None:
    assert load_policy(str(write(tmp_path / "p.toml", mode=0o400))).allow


@pytest.mark.parametrize(
    ("mode", "who"),
    [(0o664, "group"), (0o646, "others"), (0o666, "group and others"), (0o620, "group")],
)
def test_writable_file_refused(tmp_path: Path, mode: int, who: str) -> None:
    path = write(tmp_path / "p.toml", mode=mode)
    err = refused(path)
    assert err.exit_code is Exit.CONFIG
    assert str(err) == f"{path} is writable by {who} (mode {mode:04o}); {FILE_RULE}"


def test_file_owned_by_other_user_refused(tmp_path: Path, privsock_uid: int) -> None:
    path = write(tmp_path / "p.toml")
    os.chown(path, privsock_uid, -1)
    err = refused(path)
    assert err.exit_code is Exit.CONFIG
    assert str(err) == f"{path} is owned by uid {privsock_uid}; {FILE_RULE}"


def test_file_with_other_group_but_not_group_writable_loads(
    tmp_path: Path, privsock_uid: int
) -> None:
    path = write(tmp_path / "p.toml")
    os.chown(path, 0, pwd.getpwuid(privsock_uid).pw_gid)
    assert load_policy(str(path)).allow


@pytest.mark.parametrize(
    ("mode", "who"), [(0o775, "group"), (0o757, "others"), (0o777, "group and others")]
)
def test_writable_parent_refused(tmp_path: Path, mode: int, who: str) -> None:
    parent = tmp_path / "etc"
    parent.mkdir()
    path = write(parent / "p.toml")
    parent.chmod(mode)
    err = refused(path)
    assert err.exit_code is Exit.CONFIG
    assert str(err) == f"{parent} is writable by {who} (mode {mode:04o}); {DIR_RULE}"


def test_writable_grandparent_refused(tmp_path: Path) -> None:
    grandparent = tmp_path / "a"
    (grandparent / "b").mkdir(parents=True)
    path = write(grandparent / "b" / "p.toml")
    grandparent.chmod(0o770)
    err = refused(path)
    assert err.exit_code is Exit.CONFIG
    assert str(err).startswith(f"{grandparent} is writable by group (mode 0770)")


def test_root_owned_sticky_parent_loads(tmp_path: Path) -> None:
    parent = tmp_path / "tmp"
    parent.mkdir()
    parent.chmod(0o1777)
    assert load_policy(str(write(parent / "p.toml"))).allow


def test_sticky_parent_owned_by_other_user_refused(tmp_path: Path, privsock_uid: int) -> None:
    parent = tmp_path / "tmp"
    parent.mkdir()
    parent.chmod(0o1777)
    os.chown(parent, privsock_uid, -1)
    err = refused(write(parent / "p.toml"))
    assert err.exit_code is Exit.CONFIG
    assert str(err) == f"{parent} is owned by uid {privsock_uid}; {DIR_RULE}"


def test_parent_owned_by_other_user_refused(tmp_path: Path, privsock_uid: int) -> None:
    parent = tmp_path / "etc"
    parent.mkdir(mode=0o755)
    path = write(parent / "p.toml")
    os.chown(parent, privsock_uid, -1)
    err = refused(path)
    assert err.exit_code is Exit.CONFIG
    assert str(err) == f"{parent} is owned by uid {privsock_uid}; {DIR_RULE}"


def test_symlink_to_good_file_loads(tmp_path: Path) -> None:
    # A root-owned symlink in a root-only directory is followed; the file it names
    # and the directories on the way to it are checked.
    target = write(tmp_path / "real.toml")
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    assert load_policy(str(link)).allow


def test_symlink_to_insecure_file_names_the_real_file(tmp_path: Path) -> None:
    target = write(tmp_path / "real.toml", mode=0o666)
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    err = refused(link)
    assert err.exit_code is Exit.CONFIG
    assert str(err).startswith(f"{target} is writable by group and others")


def test_symlinked_directory_checks_the_real_directory(tmp_path: Path) -> None:
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    write(real_dir / "p.toml")
    real_dir.chmod(0o777)
    (tmp_path / "alias").symlink_to(real_dir)
    err = refused(tmp_path / "alias" / "p.toml")
    assert err.exit_code is Exit.CONFIG
    assert str(err).startswith(f"{real_dir} is writable by group and others (mode 0777)")


def _sticky(tmp_path: Path) -> Path:
    """A root-owned world-writable sticky directory, like /tmp."""
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    return sticky


def test_user_owned_symlink_in_a_sticky_directory_refused(
    tmp_path: Path, privsock_uid: int
) -> None:
    """The reported case: a user plants /tmp/x.toml pointing at a root policy.
    The kernel (fs.protected_symlinks) refuses root to follow it; so must we."""
    target = write(tmp_path / "bench.toml")
    link = _sticky(tmp_path) / "x.toml"
    link.symlink_to(target)
    os.lchown(link, privsock_uid, -1)
    if Path("/proc/sys/fs/protected_symlinks").read_text().strip() == "1":
        with pytest.raises(PermissionError):
            link.read_bytes()  # the kernel's own verdict, which load_policy must not undo
    err = refused(link)
    assert err.exit_code is Exit.CONFIG
    assert str(err) == (
        f"{link} is a symlink owned by uid {privsock_uid}; "
        "a symlink on the way to the policy must be owned by root"
    )


def test_user_owned_symlink_to_a_directory_refused(tmp_path: Path, privsock_uid: int) -> None:
    real = tmp_path / "real"
    real.mkdir()
    write(real / "p.toml")
    alias = _sticky(tmp_path) / "alias"
    alias.symlink_to(real)
    os.lchown(alias, privsock_uid, -1)
    err = refused(alias / "p.toml")
    assert err.exit_code is Exit.CONFIG
    assert str(err).startswith(f"{alias} is a symlink owned by uid {privsock_uid}")


def test_root_owned_symlink_in_a_root_only_directory_loads(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o755)
    (tmp_path / "policies").mkdir(mode=0o755)
    write(tmp_path / "policies" / "p.toml")
    (etc / "privsock.toml").symlink_to("../policies/p.toml")  # relative, through ..
    assert load_policy(str(etc / "privsock.toml")).allow


def test_root_owned_symlink_in_a_sticky_directory_loads(tmp_path: Path) -> None:
    link = _sticky(tmp_path) / "p.toml"
    link.symlink_to(write(tmp_path / "real.toml"))
    assert load_policy(str(link)).allow


def test_dot_dot_after_a_symlink_goes_up_from_its_target(tmp_path: Path) -> None:
    # As the kernel walks it: alias/.. is the parent of alias's target, not tmp_path.
    (tmp_path / "a" / "b").mkdir(parents=True)
    write(tmp_path / "a" / "p.toml")
    write(tmp_path / "p.toml", GOOD.replace("ports = [53]", "ports = [0]"))
    (tmp_path / "alias").symlink_to(tmp_path / "a" / "b")
    assert load_policy(str(tmp_path / "alias" / ".." / "p.toml")).allow


def test_relative_path_is_walked_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "p.toml")
    monkeypatch.chdir(tmp_path)
    assert load_policy("p.toml").allow
    assert load_policy("./p.toml").allow


@pytest.mark.parametrize(("links", "loads"), [(40, True), (41, False)])
def test_at_most_forty_symlinks(tmp_path: Path, links: int, loads: bool) -> None:
    previous = write(tmp_path / "p.toml")
    for i in range(links):
        link = tmp_path / f"l{i}"
        link.symlink_to(previous.name)
        previous = link
    if loads:
        assert load_policy(str(previous)).allow
    else:
        err = refused(previous)
        assert err.exit_code is Exit.NOINPUT
        assert str(err) == f"{previous}: more than 40 symlinks on the way"


def test_symlink_loop_refused(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    err = refused(tmp_path / "a")
    assert err.exit_code is Exit.NOINPUT
    assert "more than 40 symlinks" in str(err)


def test_dangling_symlink(tmp_path: Path) -> None:
    (tmp_path / "p.toml").symlink_to("gone.toml")
    err = refused(tmp_path / "p.toml")
    assert err.exit_code is Exit.NOINPUT
    assert str(err) == f"{tmp_path}/gone.toml: cannot open: No such file or directory"


@pytest.mark.parametrize("suffix", ["/", "/.", "/.."])
def test_a_path_naming_a_directory_refused(tmp_path: Path, suffix: str) -> None:
    write(tmp_path / "p.toml")
    err = refused(f"{tmp_path}/p.toml{suffix}")
    assert err.exit_code is Exit.NOINPUT


def test_a_file_in_the_middle_of_the_path_refused(tmp_path: Path) -> None:
    write(tmp_path / "p.toml")
    err = refused(tmp_path / "p.toml" / "q.toml")
    assert err.exit_code is Exit.NOINPUT
    assert str(err) == f"{tmp_path}/p.toml is not a directory"


def test_missing_file(tmp_path: Path) -> None:
    err = refused(tmp_path / "nope.toml")
    assert err.exit_code is Exit.NOINPUT
    assert str(err) == f"{tmp_path}/nope.toml: cannot open: No such file or directory"


def test_directory_refused(tmp_path: Path) -> None:
    (tmp_path / "d.toml").mkdir()
    err = refused(tmp_path / "d.toml")
    assert err.exit_code is Exit.NOINPUT
    assert str(err) == f"{tmp_path}/d.toml is a directory, not a regular file"


def test_fifo_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "p.toml"
    os.mkfifo(fifo, 0o644)
    err = refused(fifo)
    assert err.exit_code is Exit.NOINPUT
    assert str(err) == f"{fifo} is a FIFO, not a regular file"


def test_largest_allowed_file_loads(tmp_path: Path) -> None:
    padding = "#" * (MAX_POLICY_BYTES - len(GOOD) - 1) + "\n"
    path = write(tmp_path / "p.toml", GOOD + padding)
    assert path.stat().st_size == MAX_POLICY_BYTES == 64 * 1024
    assert load_policy(str(path)).allow


def test_oversized_file_refused(tmp_path: Path) -> None:
    padding = "#" * (MAX_POLICY_BYTES - len(GOOD)) + "\n"
    path = write(tmp_path / "p.toml", GOOD + padding)
    assert path.stat().st_size == MAX_POLICY_BYTES + 1
    err = refused(path)
    assert err.exit_code is Exit.DATAERR
    assert str(err) == f"{path} is larger than 65536 bytes, the most a policy may be"


def test_invalid_utf8_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "p.toml", GOOD.encode() + b"# caf\xe9\n")
    err = refused(path)
    assert err.exit_code is Exit.DATAERR
    assert str(err) == f"{path} is not valid UTF-8 (byte 0xe9 at offset {len(GOOD) + 5})"


def test_invalid_policy_keeps_the_policy_error_line(tmp_path: Path) -> None:
    path = write(tmp_path / "p.toml", GOOD.replace("ports = [53]", "ports = [0]"))
    err = refused(path)
    assert err.exit_code is Exit.DATAERR
    assert str(err) == f"{path}: allow[0].ports[0]: port 0 is outside 1-65535"


def test_message_stays_on_one_line_for_odd_paths(tmp_path: Path) -> None:
    path = write(tmp_path / "new\nline.toml", mode=0o666)
    err = refused(path)
    assert err.exit_code is Exit.CONFIG
    assert "new\\nline.toml" in str(err)
