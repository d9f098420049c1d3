"""Training: recipes (TOML/YAML), contrastive encoder pretraining, alignment and instruction tuning
(full or LoRA), preference alignment (DPO, MPO's mixture), checkpoints that resume exactly, logs,
curves, evaluation, and DDP or FSDP under torchrun.

    from tinyomni.train import load_recipe, train
    result = train(load_recipe("recipes/toy.toml"))     # tinyomni train recipes/toy.toml
    tinyomni.load(result.model_dir)                     # the trained model

See trainer.py for one optimizer step, data.py for the data order, recipe.py for every field.
"""

from tinyomni.train.recipe import Recipe, StageSpec, load_recipe, recipe_from_dict
from tinyomni.train.trainer import RunResult, build_model, train

__all__ = ["Recipe", "RunResult", "StageSpec", "build_model", "load_recipe", "recipe_from_dict", "train"]
