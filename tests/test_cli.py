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


def test_generate_writes_a_png_for_t2i_and_a_playable_mp4_for_t2v(tmp_path, tiny_ckpt, capsys):
    from lance_rl.model import media

    args = ["generate", "--checkpoint", str(tiny_ckpt), "--steps", "2", "--cfg", "2.0"]
    assert main(args + ["--task", "t2i", "--prompt", "two red circles", "--num-samples", "2", "--out", str(tmp_path / "img"), "--save-latents"]) == 0
    pngs = sorted((tmp_path / "img").glob("sample_*.png"))
    assert len(pngs) == 2 and media.read_image(pngs[0]).shape == (32, 32, 3)
    record = json.loads((tmp_path / "img" / "generation.json").read_text())
    assert record["seeds"] == [42, 43] and record["settings"]["cfg"] == 2.0 and record["latent_grid"] == [1, 8, 8]
    assert (tmp_path / "img" / "sample_000.latents.safetensors").is_file()

    assert main(args + ["--task", "t2v", "--prompt", "a circle moving", "--frames", "5", "--out", str(tmp_path / "vid")]) == 0
    frames, _ = media.read_video(tmp_path / "vid" / "sample_000.mp4", frame_rule=None)
    assert frames.shape == (5, 32, 32, 3)
    assert (tmp_path / "vid" / "sample_000.gif").is_file()


def test_generate_edit_and_understand_take_media(tmp_path, tiny_ckpt, capsys):
    import numpy as np

    from lance_rl.model import media

    image = tmp_path / "src.png"
    media.write_png(np.full((40, 40, 3), 200, dtype=np.uint8), image)
    assert main(["generate", "--checkpoint", str(tiny_ckpt), "--task", "image_edit", "--image", str(image),
                 "--prompt", "make it blue", "--steps", "2", "--out", str(tmp_path / "edit")]) == 0  # fmt: skip
    assert media.read_image(tmp_path / "edit" / "sample_000.png").shape[:2] == (32, 32)  # the bucketed source size
    capsys.readouterr()
    assert main(["understand", "--checkpoint", str(tiny_ckpt), "--image", str(image), "--question", "what is it?",
                 "--max-new-tokens", "3"]) == 0  # fmt: skip
    assert capsys.readouterr().out.endswith("\n")  # random weights answer noise; the command prints it and succeeds


def test_generate_explains_a_missing_source(tmp_path, tiny_ckpt, capsys):
    assert main(["generate", "--checkpoint", str(tiny_ckpt), "--task", "image_edit", "--prompt", "x", "--out", str(tmp_path)]) == 2
    assert "needs --image or --video" in capsys.readouterr().err


def test_bench_rollout_reports_both_timings(tmp_path, capsys):
    assert main(["bench", "rollout", "--group-size", "2", "--steps", "2", "--out", str(tmp_path / "b.json")]) == 0
    (result,) = json.loads((tmp_path / "b.json").read_text())
    assert result["group_size"] == 2 and result["grouped_s"] > 0 and result["one_at_a_time_s"] > 0 and "speedup" in result


def test_init_tiny_with_a_tiny_wan_vae_generates_video(tmp_path, capsys):
    from lance_rl.model import media

    ckpt = tmp_path / "wan"
    assert main(["init-tiny", str(ckpt), "--vae", "wan2.2"]) == 0
    assert main(["inspect", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["vae"]["kind"] == "wan2.2" and info["vae"]["weights"].endswith("Wan2.2_VAE")
    assert main(["generate", "--checkpoint", str(ckpt), "--task", "t2v", "--prompt", "a circle", "--frames", "5",
                 "--height", "32", "--width", "32", "--steps", "2", "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    record = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert record["codec"] == "WanVAE" and record["latent_grid"] == [2, 2, 2]  # 5 frames -> 2 latent frames, 16x
    frames, _ = media.read_video(tmp_path / "out" / "sample_000.mp4", frame_rule=None)
    assert frames.shape == (5, 32, 32, 3)
