"""The `lance-rl` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _init_tiny(args: argparse.Namespace) -> int:
    from lance_rl.model.checkpoint import init_tiny, inspect_checkpoint

    out = init_tiny(args.out_dir, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.num_layers, vae=args.vae)
    info = inspect_checkpoint(out)
    params = info["parameters"]
    print(
        f"wrote a tiny random Lance to {out} (seed {args.seed}): hidden {args.hidden_size}, {args.num_layers} layers, "
        f"{params['total']:,} parameters, tokenizer of {info['tokenizer']['len']} tokens, VAE '{args.vae}'"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from lance_rl.model.checkpoint import inspect_checkpoint

    info = inspect_checkpoint(args.checkpoint, vit_dir=args.vit_dir, weights=args.weights)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_inspection(info)
    return 0 if info["keys"]["ok"] else 1


def _print_inspection(info: dict) -> None:
    c, p, k, s = info["config"], info["parameters"], info["keys"], info["stored"]
    print(f"checkpoint   {info['checkpoint']} ({info['weights_file']})")
    print(
        f"backbone     hidden {c['hidden_size']}, {c['num_hidden_layers']} layers x 2 experts, "
        f"{c['num_attention_heads']} heads / {c['num_key_value_heads']} kv heads (head_dim {c['head_dim']}), "
        f"mlp {c['intermediate_size']}, vocab rows {c['vocab_size']}, mrope {c['mrope_section']}"
    )
    if info["tokenizer"]:
        t = info["tokenizer"]
        print(f"tokenizer    {t['len']} tokens; im_start {t['im_start']}, im_end {t['im_end']}, "
              f"vision_start {t['vision_start']}, vision_end {t['vision_end']}, video_pad {t['video_pad']}")  # fmt: skip
    if info["vit"]:
        v = info["vit"]
        print(f"vit          depth {v['depth']}, hidden {v['hidden_size']}, {v['num_heads']} heads -> "
              f"{v['out_hidden_size']} ({info['vit_dir'] or 'from model file'})")  # fmt: skip
    v = info["vae"]
    print(f"generation   latent channels {c['latent_channels']}, max latent size {c['max_latent_size']}, "
          f"max frames {c['max_num_frames']}")  # fmt: skip
    print(f"vae          {v['kind']}: {v['weights'] or '-'} ({v['note']})")
    print("parameters   " + ", ".join(f"{name} {count:,}" for name, count in p.items()))
    print(f"stored       {s['tensors']} tensors, {s['parameters']:,} values, dtypes {s['dtypes']}")
    status = "all keys match" if k["ok"] else "KEY PROBLEMS"
    print(
        f"keys         {status}: {k['loaded']}/{k['expected']} loaded, {len(k['missing'])} missing, "
        f"{len(k['unexpected'])} unexpected, {len(k['mismatched'])} mismatched, dropped {k['dropped'] or 'none'}, "
        f"copied from und {len(k['copied_from_und'])}"
    )
    for key in k["missing"][:20]:
        print(f"  missing    {key}")
    for key in k["unexpected"][:20]:
        print(f"  unexpected {key}")
    for m in k["mismatched"][:20]:
        print(f"  mismatch   {m['key']}: model {m['expected']}, file {m['found']}")


def _generate(args: argparse.Namespace) -> int:
    from lance_rl.inference import GenerateSettings, run_generate

    fields = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    fields["cfg_interval"] = tuple(fields["cfg_interval"])
    record = run_generate(GenerateSettings(**fields))
    print(f"wrote {len(record['outputs'])} file(s) to {args.out} in {record['seconds']} s; settings in "
          f"{args.out}/generation.json")  # fmt: skip
    for path in record["outputs"]:
        print(f"  {path}")
    return 0


def _understand(args: argparse.Namespace) -> int:
    from lance_rl.inference import run_understand

    print(run_understand(args.checkpoint, args.question, image=args.image, video=args.video,
                         resolution=args.resolution, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed, mape=args.mape,
                         device=args.device))  # fmt: skip
    return 0


def _sft(args: argparse.Namespace) -> int:
    from lance_rl.sft import recipe_main

    last = recipe_main(args.config, args.overrides, resume=args.resume)
    print(f"sft finished at step {last.get('step')}: loss {last.get('loss', float('nan')):.4f}")
    return 0


def _rl(args: argparse.Namespace) -> int:
    from lance_rl.model.tasks import is_understanding
    from lance_rl.x2t import recipe_task

    task = recipe_task(args.config, args.overrides)
    if task is not None and is_understanding(task):  # x2t recipes: GRPO on the understanding expert with TRL
        from lance_rl.x2t import recipe_main as x2t_main

        last = x2t_main(args.config, args.overrides, resume=args.resume)
        accuracy = last.get("eval/accuracy/mean")
        print(f"rl ({task}, TRL GRPO) finished at update {last.get('update')}: reward "
              f"{last.get('reward/mean', float('nan')):.4f}" + (f", held-out accuracy {accuracy:.4f}" if accuracy is not None else ""))  # fmt: skip
        return 0

    from lance_rl.rl import recipe_main

    last = recipe_main(args.config, args.overrides, resume=args.resume)
    print(f"rl finished at update {last.get('update')}: reward {last.get('reward/mean', float('nan')):.4f}"
          + (f", eval {last['eval/reward/mean']:.4f}" if "eval/reward/mean" in last else ""))  # fmt: skip
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from lance_rl.pipeline import pipeline_main

    result = pipeline_main(args.config, args.overrides, resume=args.resume)
    print(f"pipeline finished: SFT {result['sft_s']:.0f} s, RL {result['rl_s']:.0f} s; report {result['report']}")
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    if args.task == "x2t":
        return _x2t_quickstart(args)
    from lance_rl.pipeline import quickstart

    result = quickstart(args.out or "runs/quickstart", resume=not args.fresh)
    before, after = result["heldout"]["after_sft"], result["heldout"]["after_rl"]
    e = result["eval"]
    print(f"\nheld-out shapes accuracy ({e['num_prompts']} captions never trained on, {e['samples_per_prompt']} samples "
          f"each, ODE, fixed seeds; background_tint: how far the canvas is from white, lower is cleaner):")
    print(f"  {'':16} {'after SFT':>10} {'after RL':>10}")
    for key in ("shapes", "strict", "color", "count", "position", "shape", "background_tint"):
        if key in before:
            print(f"  {key:16} {before[key]:>10.3f} {after[key]:>10.3f}")
    print(f"\nSFT {result['sft_s']:.0f} s, RL {result['rl_s']:.0f} s. Report: {result['report']}")
    return 0


def _x2t_quickstart(args: argparse.Namespace) -> int:
    from lance_rl.x2t.quickstart import quickstart

    summary = quickstart(args.out or "runs/x2t", args.t2i, resume=not args.fresh)
    before, after = summary["heldout_accuracy"]["after_sft"], summary["heldout_accuracy"]["after_grpo"]
    print("\nheld-out accuracy (shapes VQA on captions never trained on, greedy):")
    print(f"  {'':10} {'after SFT':>10} {'after GRPO':>11}")
    for key in ("all", "count", "color", "position", "shape"):
        if key in before:
            print(f"  {key:10} {before[key]:>10.3f} {after[key]:>11.3f}")
    g = summary["generation_shapes_score"]
    print(f"\ngeneration (t2i shapes score): before x2t {g['before_x2t']:.3f}, after SFT {g['after_sft']:.3f}, "
          f"after GRPO {g['after_grpo']:.3f}")  # fmt: skip
    print(f"{summary['seconds']['total']:.0f} s in all. Report: {summary['report']}")
    return 0


def _curves(args: argparse.Namespace) -> int:
    from lance_rl.report import write_report

    out = write_report(args.runs, args.out)
    print(f"wrote {out} (charts as PNG beside it)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from lance_rl.export import export

    out = export(args.run, args.out, ema=args.ema)
    print(f"exported {args.run} to {out} (official layout)")
    return 0


def _shapes_data(args: argparse.Namespace) -> int:
    from lance_rl.data.shapes import write_parquet, write_video_parquet

    out = Path(args.out_dir)
    train = write_parquet(out / "train.parquet", args.num_images, "train", seed=args.seed, size=args.size)
    heldout = write_parquet(out / "heldout.parquet", args.num_heldout, "heldout", seed=args.seed + 1, size=args.size)
    print(f"wrote {args.num_images} training images to {train} and {args.num_heldout} held-out images to {heldout}")
    if args.num_clips:
        clips = write_video_parquet(out / "clips.parquet", args.num_clips, size=args.size, seed=args.seed)
        print(f"wrote {args.num_clips} clips to {clips}")
    if args.num_questions:
        from lance_rl.data.shapes import write_vqa_parquet

        vqa = write_vqa_parquet(out / "vqa.parquet", args.num_questions, "train", seed=args.seed, size=args.size)
        print(f"wrote {args.num_questions} questions and captions about new images to {vqa} (x2t_general)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from lance_rl.bench import run

    run(args.names or ["rollout", "train"], out=args.out, checkpoint=args.checkpoint, group_size=args.group_size,
        num_steps=args.steps, layers=args.layers)  # fmt: skip
    return 0


def _plan(args: argparse.Namespace) -> int:
    from lance_rl.plan import main as plan_main

    return plan_main(args)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    from lance_rl import __version__
    from lance_rl.model.tasks import GENERATION_TASKS

    parser = argparse.ArgumentParser(prog="lance-rl", description="SFT and flow-GRPO post-training for Lance.")
    parser.add_argument("--version", action="version", version=f"lance-rl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-tiny", help="write a tiny random checkpoint in the official layout")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden-size", type=int, default=64, help="a multiple of 32 (head_dim is 16)")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--vae", choices=["patch", "wan2.2"], default="patch", help="latent codec recorded in the config")
    p.set_defaults(func=_init_tiny)

    p = sub.add_parser("inspect", help="config, parameter counts and key accounting of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--vit-dir", default=None, help="the Qwen2.5-VL-ViT folder (default: inside or beside CHECKPOINT)")
    p.add_argument("--weights", choices=["auto", "model", "ema"], default="auto")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("generate", help="generate images or videos (t2i, t2v, i2v, image_edit, video_edit)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--task", required=True, choices=GENERATION_TASKS)
    p.add_argument("--prompt", required=True, help="the caption or the edit instruction")
    p.add_argument("--image", default=None, help="source image (i2v, image_edit)")
    p.add_argument("--video", default=None, help="source video (video_edit)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="video length in frames (4k+1 for Wan2.2)")
    p.add_argument("--resolution", default=None, help="source preprocessing preset (e.g. image_768res) or area side")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--shift", type=float, default=3.5)
    p.add_argument("--cfg", type=float, default=4.0, help="text guidance scale (1 = off)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=(0.4, 1.0))
    p.add_argument("--cfg-renorm", choices=["global", "channel", "none"], default="global")
    p.add_argument("--cfg-uncond-positions", choices=["official", "consistent"], default="official")
    p.add_argument("--seed", type=int, default=42, help="sample i uses seed + i")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--fps", type=float, default=12.0)
    p.add_argument("--save-latents", action="store_true")
    p.add_argument("--vae", default=None, help="Wan2.2_VAE.pth (default: inside or beside the checkpoint)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_generate)

    p = sub.add_parser("understand", help="answer a question about an image or a video")
    p.add_argument("--checkpoint", required=True)
    media = p.add_mutually_exclusive_group(required=True)
    media.add_argument("--image")
    media.add_argument("--video")
    p.add_argument("--question", required=True)
    p.add_argument("--resolution", default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mape", action="store_true", help="apply MaPE as in training (the release's inference does not)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.set_defaults(func=_understand)

    p = sub.add_parser("sft", help="supervised fine-tuning from a YAML recipe")
    p.add_argument("--config", required=True, help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value to set a field, ~key to reset it")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.set_defaults(func=_sft)

    p = sub.add_parser("rl", help="flow-GRPO from a YAML recipe (an x2t recipe: TRL GRPO on the understanding expert)")
    p.add_argument("--config", required=True, help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value to set a field, ~key to reset it")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.set_defaults(func=_rl)

    p = sub.add_parser("pipeline", help="SFT then RL as one run, resumable at either stage")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=_pipeline)

    p = sub.add_parser("quickstart", help="the shapes world end to end on this machine: SFT, RL, report")
    p.add_argument("--task", choices=["t2i", "x2t"], default="t2i",
                   help="t2i: draw the shapes (flow-GRPO); x2t: answer questions about them (TRL GRPO, after t2i)")
    p.add_argument("--out", default=None, help="run folder (default runs/quickstart, or runs/x2t for --task x2t)")
    p.add_argument("--t2i", default="runs/quickstart", help="x2t: the t2i quickstart's folder (its SFT result is the base)")
    p.add_argument("--fresh", action="store_true", help="ignore finished stages in --out and run them again")
    p.set_defaults(func=_quickstart)

    p = sub.add_parser("curves", help="reward curves and sample grids of one or more runs as PNG + one HTML file")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="report.html")
    p.set_defaults(func=_curves)

    p = sub.add_parser("export", help="merge a run's latest checkpoint into an official-layout model directory")
    p.add_argument("run", help="a run directory (or one of its checkpoint directories)")
    p.add_argument("--out", required=True)
    p.add_argument("--ema", action="store_true", help="export the EMA weights (full training)")
    p.set_defaults(func=_export)

    p = sub.add_parser("shapes-data", help="write the synthetic shapes world in the official parquet schema")
    p.add_argument("out_dir")
    p.add_argument("--num-images", type=int, default=20000)
    p.add_argument("--num-heldout", type=int, default=480)
    p.add_argument("--num-clips", type=int, default=0, help="also write moving-shapes clips (text2video_general)")
    p.add_argument("--num-questions", type=int, default=0,
                   help="also write shapes questions and captions (x2t_general, 1/4 captions) about new images")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_shapes_data)

    sub.add_parser("serve-reward", help="serve a reward over HTTP (see rewards/remote.py; --help for options)")

    p = sub.add_parser("plan", help="per-GPU memory of every role a recipe starts (parameters exact, activations measured)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value to set a field, ~key to reset it")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU")
    p.add_argument("--json", action="store_true", help="print one JSON object (fits, max_gpu_gb, gpus, roles)")
    p.set_defaults(func=_plan)

    p = sub.add_parser("bench", help="throughput benchmarks (ratios measured in one run) and memory (bytes counted)")
    p.add_argument("names", nargs="*", help="benchmarks to run: rollout, train, memory, sync (default: rollout and train)")
    p.add_argument("--layers", type=int, default=2, help="memory, sync: decoder layers at the released widths")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: a fresh tiny one)")
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-reward"]:  # its own parser lives with the server
        from lance_rl.rewards.remote import main as serve_main

        return serve_main(argv[1:]) or 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except _known_failures() as e:
        # One line that names the field or file, no traceback: the failure is the input's, not the program's.
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"lance-rl {args.command}: error: {message}", file=sys.stderr)
        code = 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun rank
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """A rank launched by torchrun leaves without the interpreter's teardown, once its work is written and its
    process group destroyed: c10d's C++ threads can still be joinable when static destructors run, which aborts the
    process ("terminate called without an active exception", seen about once in ten 2-rank runs with gloo) and fails a
    run that finished. What atexit would have done for a Ray driver is done here."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _known_failures() -> tuple[type[BaseException], ...]:
    """Failures a user can fix from the message alone: a wrong recipe field, a missing or corrupt file, a reward
    that cannot be imported or failed after its retries, a stale rollout."""
    from lance_rl.rewards.base import RewardError
    from lance_rl.rewards.registry import UnknownRewardError
    from lance_rl.rollout import StaleRollout
    from lance_rl.trainer import CorruptCheckpoint

    # ValueError covers RecipeError, CheckpointError, MediaError and ModalityError.
    return (FileNotFoundError, ValueError, ImportError, UnknownRewardError, RewardError, CorruptCheckpoint, StaleRollout)


if __name__ == "__main__":
    sys.exit(main())
