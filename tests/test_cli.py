import subprocess
import sys


def test_help_prints_only_the_help():
    # every sub-command's module is imported to build the parser, so this covers import-time noise of all of them
    done = subprocess.run(
        [sys.executable, "-m", "dalpsr.cli", "make-pairs", "--help"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: dalpsr make-pairs")
    assert done.stderr == ""
