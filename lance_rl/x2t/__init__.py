"""GRPO on Lance's understanding expert with TRL: `lance-rl rl --config recipes/quickstart/x2t_grpo.yaml`.

The recipe's `task` (x2t_image, x2t_video) sends `lance-rl rl` here instead of the flow-GRPO loop. The model is
`lance_rl.model.hf.LanceForUnderstanding` (Lance's understanding path as a transformers model) with its
`LanceProcessor`, trained by TRL's `GRPOTrainer`, which owns the loop: sample a group of answers per question (the
wrapper's KV-cache `generate`), score them with our rewards (each one a TRL reward function, below), group
advantages, the clipped policy loss (TRL's `loss_type`, `importance_sampling_level="sequence"` for GSPO), PEFT LoRA on
the understanding expert or full training, accelerate underneath. This file adds what a Lance run needs around it:

    setup     check the recipe, load the checkpoint (official layout), decide what trains, build the data, the rewards
              and the trainer
    train     evaluate (update 0), then `trainer.train()`; the callback evaluates every `eval.every` updates, logs one
              metrics.jsonl row per update (`update` key: `lance-rl curves` draws it) and checkpoints
    evaluate  greedy answers (the release's inference) on held-out images: accuracy per question type, the training
              rewards, and (generation.evaluate) the t2i shapes score of the same model, because in Lance the text
              of a generation prompt passes through the understanding expert that is training here
    save      checkpoints/update_NNNNN/adapter (+ base_checkpoint.txt) or model/ (official layout), then `latest`:
              `lance-rl export RUN` merges the LoRA into the official layout

Keeping generation: `generation.keep: answer_only` trains only modules downstream of every key and value the
generation expert reads (the last layer's understanding q/o projections, post-attention norm and MLP; for full
training also the final norm and lm_head), so generation is exactly unchanged; `generation.keep: guard` evaluates
generation at every evaluation and stops the run when its score falls more than `generation.max_drop` below the
start, the last checkpoint within the bound staying `latest`.

Determinism: the data, LoRA initialisation (TRL seeds before wrapping), prompt order and sampling all follow
`train.seed` / `data.seed`; evaluation is greedy.
"""

from lance_rl.x2t.config import X2TConfig, recipe_task
from lance_rl.x2t.recipe import X2TRecipe, recipe_main

__all__ = ["X2TConfig", "X2TRecipe", "recipe_main", "recipe_task"]
