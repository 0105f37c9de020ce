"""The benchmarks' model: the demo bot (domain.yml, data/) with bench/bot/config.yml's keyword
classifier, trained once into models/ and again only when one of its inputs is newer.

Rasa's KeywordIntentClassifier reads each training example as a regular expression, and fails
(a KeyError in `_validate_keyword_map`) when an example is found in two others of other intents,
so examples that are not a regular expression (the demo's "???") or are found in another intent's
example ("no" in "no more messages") are left out of the copy it trains on."""

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
CONFIG = ROOT / "bench" / "bot" / "config.yml"
MODEL = ROOT / "models" / "bench-keyword.tar.gz"


def _keyword(line: str) -> str:
    return re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", line.strip()[2:])


def _usable(keyword: str, intent: str, examples: Dict[str, List[str]]) -> bool:
    try:
        pattern = re.compile(r"\b" + keyword + r"\b", re.IGNORECASE)
    except re.error:
        return False
    return not any(pattern.search(other) for name, others in examples.items() if name != intent for other in others)


def _training_data(into: Path) -> None:
    for path in (ROOT / "data").glob("*.yml"):
        shutil.copy(path, into / path.name)
    nlu = yaml.safe_load((ROOT / "data" / "nlu.yml").read_text())
    intents = [item for item in nlu["nlu"] if "intent" in item]
    examples = {item["intent"]: [_keyword(line) for line in item["examples"].splitlines()] for item in intents}
    for item in intents:
        lines = [line for line in item["examples"].splitlines() if _usable(_keyword(line), item["intent"], examples)]
        item["examples"] = "\n".join(lines) + "\n"
    (into / "nlu.yml").write_text(yaml.safe_dump(nlu, sort_keys=False))


def model() -> Path:
    inputs = [CONFIG, ROOT / "domain.yml", *(ROOT / "data").rglob("*.yml")]
    if MODEL.exists() and MODEL.stat().st_mtime > max(p.stat().st_mtime for p in inputs):
        return MODEL
    print(f"training {MODEL.name} (keyword classifier) ...", flush=True)
    with tempfile.TemporaryDirectory() as data:
        _training_data(Path(data))
        subprocess.run([str(ROOT / ".venv" / "bin" / "rasa"), "train", "--config", str(CONFIG), "--domain", "domain.yml",
                        "--data", data, "--out", str(MODEL.parent), "--fixed-model-name", MODEL.stem.split(".")[0]],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return MODEL
