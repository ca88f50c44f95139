"""Entry point for the multi-process tests: train a recipe, optionally dying after the Nth checkpoint.

    accelerate launch --multi_gpu --num_processes 2 tests/ddp_train.py RECIPE.yaml RUN_DIR [--die-after N] [--resume]
"""

import sys

import finetune.loop
from finetune import Recipe


def main() -> None:
    recipe_path, run_dir, *flags = sys.argv[1:]
    if "--die-after" in flags:
        limit = int(flags[flags.index("--die-after") + 1])
        real_replace, saves = finetune.loop.replace_dir, []

        def replace_then_die(tmp, final):
            real_replace(tmp, final)
            if final.name == "last":
                saves.append(final)
                if len(saves) == limit:
                    raise SystemExit(3)  # only the main process moves checkpoints; the launcher stops the other

        finetune.loop.replace_dir = replace_then_die
    Recipe.from_yaml(recipe_path, overrides=[f"output.dir={run_dir}"]).run(resume="--resume" in flags)


if __name__ == "__main__":
    main()
