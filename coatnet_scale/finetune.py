"""`python -m coatnet_scale.finetune --config FILE --init CHECKPOINT_URL [--set key=value ...]`

Fine-tune from pretrained weights with the same Ray + DeepSpeed ZeRO-3 engine as pretraining.
`--init` takes a checkpoint written by the engine on any number of workers (a step folder, a
run's checkpoints folder or the run folder: the newest complete checkpoint is used), local or
on any fsspec store, or an export (.safetensors). The weights are consolidated, every
relative-position table is resized to `model.image_size`, and the classifier is replaced when
the class count differs (or `finetune.new_classifier` says so). A run that already has
checkpoints of its own (a restart) resumes from those, not from `--init`.

The paper's recipe is in configs/coatnet{5,6,7}_ft{384,512}.yaml; launch/handoff.py submits
both resolutions for a finished pretraining run in one command.
"""
from __future__ import annotations

import argparse
import sys

from coatnet_scale.config import ConfigError, add_config_arguments, config_from_arguments
from coatnet_scale.pretrain import add_launcher_arguments, launch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coatnet_scale.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--init", metavar="URL", help="pretrained checkpoint or export (sets finetune.init_checkpoint)")
    add_launcher_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_arguments(args)
    try:
        if args.init:
            config.finetune.init_checkpoint = args.init
    except (ConfigError, ValueError) as e:
        print(f"finetune: --init: {e}", file=sys.stderr)
        return 2
    if not config.finetune.init_checkpoint:
        print("finetune: no pretrained weights: give --init URL (or finetune.init_checkpoint in the config)",
              file=sys.stderr)
        return 2
    return launch(config, "finetune", args.without_ray)


if __name__ == "__main__":
    sys.exit(main())
