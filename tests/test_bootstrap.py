"""scripts/bootstrap.sh is sourced by run.sh and test.sh, so its variables land in theirs."""

import shutil
import subprocess
import sys

from tests.stack import ROOT


def test_training_on_a_fresh_clone_leaves_the_callers_variables_alone(tmp_path):
    """run.sh times its "ready in N s" from its own `started`; a fresh clone printed
    "ready in 1796305485 s" when the bootstrap's timing overwrote it."""
    for name in ("requirements.txt", "config.yml", "domain.yml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "data", tmp_path / "data")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "bootstrap.sh", tmp_path / "scripts")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    python = venv_bin / "python"  # the real venv, which a symlink would not carry along
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    digest = subprocess.run(["sha256sum", "requirements.txt"], cwd=tmp_path, capture_output=True, text=True,
                            check=True).stdout.split()[0]
    (tmp_path / ".venv" / ".requirements.sha256").write_text(digest + "\n")
    rasa = venv_bin / "rasa"  # stands in for `rasa train`: the model appears, no minute of training
    rasa.write_text("#!/usr/bin/env bash\nmkdir -p models && : > models/whatsapp-demo.tar.gz\n")
    rasa.chmod(0o755)

    script = 'started=1700000000.25; source scripts/bootstrap.sh; echo "started=$started"'
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "bootstrap: trained in" in done.stdout  # the training branch ran
    assert (tmp_path / "models" / "whatsapp-demo.tar.gz").exists()
    assert done.stdout.strip().splitlines()[-1] == "started=1700000000.25"
