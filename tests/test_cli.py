"""The command line as a user runs it."""

import json
import subprocess
import sys

from lance_rl.cli import main


def test_init_tiny_then_inspect_json(tmp_path, capsys):
    assert main(["init-tiny", str(tmp_path / "t"), "--seed", "3"]) == 0
    assert "wrote a tiny random Lance" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "t"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["keys"]["ok"] and info["keys"]["missing"] == []
    assert info["vit"]["depth"] == 2 and info["config"]["vae"] == "patch"
    assert info["parameters"]["total"] == info["stored"]["parameters"]
    assert info["parameters"]["active_per_token"] < info["parameters"]["total"]


def test_init_tiny_is_deterministic_per_seed(tmp_path):
    from safetensors.torch import load_file

    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert main(["init-tiny", str(tmp_path / name), "--seed", str(seed)]) == 0
    a, b, c = (load_file(tmp_path / n / "model.safetensors") for n in "abc")
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)


def test_inspect_reports_problems_and_errors_cleanly(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "no llm_config.json" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "lance_rl.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "init-tiny" in result.stdout and "inspect" in result.stdout
