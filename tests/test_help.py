"""Every entry point answers -h/--help with its usage, options and an example
(exit 0, no traceback), and `t5lab` without a known command exits 2 with its
usage on stderr."""
import glob
import os
import subprocess
import sys

import pytest

from t5lab import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tools", "*.py")))
ENTRY_POINTS = ([["-m", "t5lab.cli"], ["-m", "t5lab.cli", "train"], ["-m", "t5lab.cli", "export"],
                 ["-m", "t5lab.cli", "prepare"], ["-m", "t5lab.train"]] + [[tool] for tool in TOOLS])


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=" ".join)
def test_help_shows_usage_and_an_example(entry, flag):
    p = run(*entry, flag)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "usage" in p.stdout.lower() and "example" in p.stdout.lower(), p.stdout


def test_train_help_needs_no_config_and_names_every_config_group():
    p = run("-m", "t5lab.cli", "train", "--config", "no/such/config.py", "--help")
    assert p.returncode == 0, p.stderr[-3000:]
    for group in config_lib.schema():
        assert group in p.stdout, group
    for flag in ("--config FILE.py[:preset]", "--config.KEY=VALUE", "--workdir DIR", "--debug", "143", "130"):
        assert flag in p.stdout, flag
    assert run("-m", "t5lab.train", "--help").stdout == p.stdout  # `python -m t5lab.train` is `t5lab train`


@pytest.mark.parametrize("args,says", [([], "no command given"), (["nosuchcmd"], "unknown command 'nosuchcmd'")])
def test_no_or_an_unknown_command_exits_2_with_the_usage_on_stderr(args, says):
    p = run("-m", "t5lab.cli", *args)
    assert p.returncode == 2, p.stderr[-3000:]
    assert says in p.stderr and "usage: t5lab" in p.stderr and "Traceback" not in p.stderr
    assert p.stdout == ""
