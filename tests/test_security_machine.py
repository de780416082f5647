"""The machine a run happens on (issue 18, item 4): Ray's control plane on loopback with token
authentication, no phone number on any command line, private directories that refuse a hijack,
private writes that refuse a symlink."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from crypto.private_files import (
    PrivateDirError,
    ensure_private_dir,
    replace_private,
    write_private,
)
from tests.conftest import ENGINE_ENV, run_cli
from tests.machine_watch import Watch, check_ray, probe_gcs, session_env, wait

# ---- private directories and files ------------------------------------------------------------


def test_private_dir_is_made_0700_and_reused(tmp_path: Path):
    made = ensure_private_dir(tmp_path / "home")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert ensure_private_dir(made) == made


def test_private_dir_open_to_others_is_refused(tmp_path: Path):
    planted = tmp_path / "fedscore-x"
    planted.mkdir()
    planted.chmod(0o777)  # what an attacker leaves in /tmp before we first run
    with pytest.raises(PrivateDirError, match="open to other users"):
        ensure_private_dir(planted)
    planted.chmod(0o750)
    with pytest.raises(PrivateDirError, match="mode 750"):
        ensure_private_dir(planted)


def test_private_dir_of_another_user_is_refused(tmp_path: Path, monkeypatch):
    planted = tmp_path / "fedscore-x"
    planted.mkdir(mode=0o700)
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1)  # the directory is now someone else's
    with pytest.raises(PrivateDirError, match="belongs to another user"):
        ensure_private_dir(planted)


def test_private_dir_through_a_symlink_is_refused(tmp_path: Path):
    target = tmp_path / "theirs"
    target.mkdir(mode=0o700)
    (tmp_path / "fedscore-x").symlink_to(target)
    with pytest.raises(PrivateDirError, match="symbolic link"):
        ensure_private_dir(tmp_path / "fedscore-x")


@pytest.mark.slow
def test_engine_refuses_a_hijacked_home_in_the_temp_dir(tmp_path: Path):
    """The whole CLI stops with a clear error, before any engine starts."""
    planted = tmp_path / f"fedscore-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    env = {**os.environ, **ENGINE_ENV, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "audit", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "open to other users" in out
    assert "Traceback" not in out
    assert list(planted.iterdir()) == []  # nothing of ours went in


@pytest.mark.parametrize("write", [write_private, replace_private])
def test_private_writes_never_follow_a_symlink(tmp_path: Path, write):
    victim = tmp_path / "victim"
    victim.write_bytes(b"theirs")
    (tmp_path / "node.key").symlink_to(victim)
    with pytest.raises(OSError, match=r"Too many levels of symbolic links|File exists"):
        write(tmp_path / "node.key", b"secret")
    assert victim.read_bytes() == b"theirs"


def test_replace_private_leaves_the_file_0600(tmp_path: Path):
    path = tmp_path / "server.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    replace_private(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# ---- the phone number off the command line ----------------------------------------------------


@pytest.mark.slow
def test_subject_on_the_command_line_is_refused(tmp_path: Path):
    phone = "13812345678"
    proc = run_cli("score", str(tmp_path), "--subject", phone, cwd=tmp_path, engine=False)
    assert proc.returncode == 2
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "--subject PHONE puts the phone number on the command line" in out
    assert "stdin" in out
    assert "--subject-file" in out
    assert phone not in out


@pytest.mark.slow
def test_an_empty_stdin_is_refused(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "score", str(tmp_path)],
                          input="", cwd=tmp_path, env={**os.environ, **ENGINE_ENV},
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "no phone number given" in " ".join((proc.stdout + proc.stderr).split())


# ---- Ray on loopback, with token authentication -----------------------------------------------
# (`serve` is watched the same way in tests/test_people.py: one served session for both.)


@pytest.mark.slow
def test_score_session_on_loopback_with_token_and_no_phone_on_any_command_line(
        small_run: Path, tmp_path: Path):
    from tests.test_people import _copy_run, _phones

    run = _copy_run(small_run, tmp_path)
    people = _phones(run)
    phone = str(people[people["status"] == "scored"].iloc[0]["phone"])
    proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", "score", str(run)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=session_env(tmp_path))
    watch = Watch(proc.pid, phone)
    sampler = threading.Thread(target=watch.run, daemon=True)
    sampler.start()
    try:
        proc.stdin.write(phone + "\n")
        proc.stdin.close()
        proc.stdin = None  # communicate() below must not touch the closed pipe
        # Ask GCS while the session is up (it closes with the command).
        wait(lambda: watch.gcs_port is not None and watch.token is not None, 120,
             "Ray GCS", proc)
        probe_gcs(watch)
        out, err = proc.communicate(timeout=300)
    finally:
        watch.stop.set()
        sampler.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "score " in out
    check_ray(watch)
    assert watch.phone_in == set(), "the phone number was on a command line"
    assert watch.jobs_seen >= 1, "the sampler never read Ray's job table"
    assert not watch.phone_in_jobs
