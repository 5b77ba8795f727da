import subprocess
import sys

from PIL import Image


def test_help_prints_only_the_help():
    # `dalpsr --help` imports every sub-command's module, so this covers import-time noise of all of them
    done = subprocess.run([sys.executable, "-m", "dalpsr.cli", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: dalpsr")
    assert "make-pairs" in done.stdout and "convert-seesr" in done.stdout
    assert done.stderr == ""


PROBE = """
import sys
from dalpsr.cli import main
code = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.startswith(("dalpsr.commands.", "dalpsr.pipelines.pipeline")))
print("LOADED", ",".join(loaded))
sys.exit(code)
"""


def test_a_command_imports_only_its_own_module_and_the_dat_engine_no_pipeline(tmp_path):
    # the fresh-process cost of `dalpsr upscale --engine dat` is mostly imports (issue 18, item 11)
    Image.new("RGB", (12, 10), (200, 10, 10)).save(tmp_path / "in.png")
    cmd = [sys.executable, "-c", PROBE, "upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out")]
    done = subprocess.run([*cmd, "--engine", "dat"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split("LOADED ")[1].strip().split(",")
    assert loaded == ["dalpsr.commands.upscale"]
    assert Image.open(tmp_path / "out" / "in.png").size == (48, 40)


def test_an_unknown_command_lists_every_command():
    done = subprocess.run(
        [sys.executable, "-m", "dalpsr.cli", "upscal", "x"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2
    assert "invalid choice: 'upscal'" in done.stderr and "make-pairs" in done.stderr
