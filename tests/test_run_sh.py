"""./run.sh test, the command CI runs: its exit status is the tests' own, through both of its pytest
processes (the workers on tests/ and the GAN's rerun on JAX beside them)."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ONE_QUICK_GAN_TEST = "test_scaling_maps_uint8_onto_tanh_range"


def run_sh_test(tmp_path, *pytest_args):
    # Its own TMPDIR, so that its pytest runs number and clear their folders apart from this one's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")} | {"TMPDIR": str(tmp_path)}
    return subprocess.run([str(REPO / "run.sh"), "test", *pytest_args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_run_sh_test_exits_0_when_both_runs_pass_and_not_when_none_does(tmp_path):
    passing = run_sh_test(tmp_path, "-k", ONE_QUICK_GAN_TEST)
    assert passing.returncode == 0, passing.stdout[-2000:] + passing.stderr[-2000:]
    assert passing.stdout.count("1 passed") == 2, passing.stdout[-2000:]  # the workers' run, then JAX's
    assert "== the GAN again, on JAX" in passing.stdout

    # Both runs fail on an option pytest does not know, before either collects a test: the same
    # exit path as failing tests, without importing them in three processes.
    refused = run_sh_test(tmp_path, "--no_such_pytest_option")
    assert refused.returncode != 0
    assert "unrecognized arguments: --no_such_pytest_option" in refused.stderr + refused.stdout
    assert not list(tmp_path.glob("tmp.*"))  # the JAX run's folder (mktemp -d) is gone
