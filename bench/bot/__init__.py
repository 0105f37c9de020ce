"""The benchmarks' model: the demo bot (domain.yml, data/) with bench/bot/config.yml's keyword
classifier, trained once into models/ and again only when one of its inputs is newer."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
CONFIG = ROOT / "bench" / "bot" / "config.yml"
MODEL = ROOT / "models" / "bench-keyword.tar.gz"


def model() -> Path:
    inputs = [CONFIG, ROOT / "domain.yml", *(ROOT / "data").rglob("*.yml")]
    if MODEL.exists() and MODEL.stat().st_mtime > max(p.stat().st_mtime for p in inputs):
        return MODEL
    print(f"training {MODEL.name} (keyword classifier) ...", flush=True)
    subprocess.run([str(ROOT / ".venv" / "bin" / "rasa"), "train", "--config", str(CONFIG), "--domain", "domain.yml",
                    "--data", "data", "--out", str(MODEL.parent), "--fixed-model-name", MODEL.name[:-len(".tar.gz")]],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return MODEL
