"""benchmarks/gpu_correctness.py runs on a lent GPU, which may come once: its dry run on this CPU
(compile mode default standing in for CUDA graphs) keeps it from rotting between such sessions."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_correctness.py"


def test_the_dry_run_checks_compiled_sampling_and_bf16_training(tmp_path):
    out = tmp_path / "correctness.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--only", "pgm", "text-tiny",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    status = {check["name"]: check["status"] for check in result["checks"]}
    assert result["finished"] and not result["failed"]
    for name in ("tokens/pgm/fp32", "logits/pgm/fp32", "replay/pgm/fp32", "training/text-tiny"):
        assert status[name] == "pass", (name, status)
    assert status["cudagraphs/pgm/fp32"] == "skipped: needs CUDA"
    assert not any(name.startswith(("tokens/mdlm", "training/vq")) for name in status)  # --only kept to its names


def test_a_name_it_does_not_know_is_refused():
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--only", "pgm", "gpt"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--only gpt: not a sampler, model or preset here" in done.stderr, done.stderr
