"""`python -m coatnet_scale.models [--config FILE]`: the registered CoAtNets with their
parameter counts (against the paper's) and FLOPs, all counted on the meta device; with a
config, also build its model for real and time one training step on random images."""
import argparse
import time

import torch

from coatnet_scale.config import add_config_arguments, config_from_arguments
from coatnet_scale.models import MODEL_SPECS, Checkpointing, count_flops, count_parameters, create_model


def print_family_table(image_size: int = 224) -> None:
    print(f"{'model':<20}{'params':>12}{'paper':>10}{'GFLOPs@' + str(image_size):>14}")
    for name, spec in MODEL_SPECS.items():
        with torch.device("meta"):
            params = count_parameters(create_model(name))
        paper = f"{spec.paper_params / 1e6:.0f}M" if spec.paper_params else "-"
        gflops = count_flops(name, image_size) / 1e9
        print(f"{name:<20}{params / 1e6:>11.2f}M{paper:>10}{gflops:>14.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    args = parser.parse_args()
    config = config_from_arguments(args)
    print_family_table()
    if args.config is None:
        return
    m = config.model
    # auto is the planner's to resolve (python -m coatnet_scale.plan); timed here as every block.
    policy = Checkpointing(every=1) if m.checkpointing == "auto" else Checkpointing(m.checkpointing.every,
                                                                                   tuple(m.checkpointing.stages))
    model = create_model(m.name, m.num_classes, m.image_size, m.drop_path_rate, policy, m.channels_last)
    images = torch.randn(config.train.micro_batch_size, 3, m.image_size, m.image_size)
    labels = torch.randint(0, m.num_classes, (len(images),))
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    seconds = time.perf_counter() - start
    print(
        f"\n{args.config}: built {m.name} at {m.image_size}px, {count_parameters(model):,} parameters; "
        f"one forward+backward of {len(images)} images took {seconds:.2f}s (loss {loss.item():.3f})"
    )


if __name__ == "__main__":
    main()
