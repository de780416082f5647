"""Engine commands forked from the zygote behave as a process of their own (tests/zygote.py)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests import zygote
from tests.conftest import _cli_env, _engine_env
from tests.ray_head import HEAD

# Slow: the zygote waits for the session's Ray head and imports the CLI (12 s of the fast loop).
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(HEAD.off(), reason="the Ray heads are off in this session")]


def _zygote(tmp_path) -> tuple[zygote.Zygote, dict[str, str]]:
    """The foreground head's zygote, ready, and a command's environment that joins its head."""
    env = _engine_env(tmp_path)  # starts the head if no test did yet
    forking = HEAD.forking(wait=True)
    assert forking is not None
    return forking, env


def _forked(tmp_path, args, **extra):
    forking, env = _zygote(tmp_path)
    return zygote.run(forking, args, cwd=tmp_path, env={**env, **extra}, timeout=120,
                      input="not read\n")


def test_a_forked_command_takes_the_callers_directory_environment_and_streams(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    result = _forked(tmp_path, ["run", "--out", "taken", "--users", "1000"],
                     COLUMNS="61")
    assert result.returncode != 0
    # The refusal names the caller's directory (its own cwd) and wraps at the caller's width.
    assert "taken" in result.stderr + result.stdout
    assert max(len(line) for line in (result.stderr + result.stdout).splitlines()) <= 61
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_a_command_the_zygote_cannot_take_runs_in_a_process_of_its_own(tmp_path):
    forking, env = _zygote(tmp_path)
    env["OMP_NUM_THREADS"] = "2"  # read by OpenMP as torch loads
    with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
        forking.spawn(["--help"], cwd=tmp_path, env=env, stdin=0, stdout=1, stderr=2)
    with open(os.devnull, "wb") as null:
        proc = zygote.launch(forking, ["--help"], cwd=tmp_path, env=env,
                             stdin=null.fileno(), stdout=null.fileno(), stderr=null.fileno())
        assert isinstance(proc, subprocess.Popen)
        proc.kill()  # no need to wait for its imports
        proc.wait(60)


def test_a_forked_command_can_be_stopped(tmp_path):
    forking, env = _zygote(tmp_path)
    with open(os.devnull, "wb") as null:
        proc = forking.spawn(["run", "--out", "r", "--users", "1000"], cwd=tmp_path, env=env,
                             stdin=null.fileno(), stdout=null.fileno(), stderr=null.fileno())
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.05)  # still generating its people
    proc.terminate()
    assert proc.wait(60) != 0
    assert proc.poll() == proc.returncode
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_a_zygote_outlives_the_thread_that_started_it(tmp_path):
    """A lane's zygote is started by whichever thread asks first (a lane's run, which ends
    long before the suite): it must serve until the suite ends, not until that thread does."""
    import threading
    import time

    env = _cli_env(tmp_path)
    started = zygote.Zygote(env)
    starter = threading.Thread(target=started.start)
    starter.start()
    starter.join()
    try:
        assert started.ready()
        time.sleep(2 * zygote._PARENT_CHECK)  # the starting thread is gone
        assert started.proc is not None
        assert started.proc.poll() is None
        result = zygote.run(started, ["keys", "init", "keys"], cwd=tmp_path, env=env,
                            timeout=120)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "keys" / "keystore.json").exists()
    finally:
        started.stop()
