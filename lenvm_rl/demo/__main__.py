"""Command line of the demo world: build it, then measure its policy.

    python -m lenvm_rl.demo build --output_dir outputs/demo/world --seed 0
    python -m lenvm_rl.demo measure --world_dir outputs/demo/world --output_dir outputs/demo

`build` takes every field of [`~lenvm_rl.demo.DemoWorldConfig`] as a flag; both take `--config YAML`.
"""

import json
import logging
import sys
from dataclasses import asdict, dataclass, field

from trl import TrlParser

from .measure import measure_demo_policy
from .world import DemoWorldConfig, build_demo_world


@dataclass
class DemoBuildArguments:
    """Arguments of `python -m lenvm_rl.demo build`; the other flags are the fields of [`DemoWorldConfig`]."""

    output_dir: str = field(metadata={"help": "Where the world goes (reused if built with the same arguments)."})
    seed: int = field(default=0, metadata={"help": "Seed of the problems, solutions, initialization and SFT."})


@dataclass
class DemoMeasureArguments:
    """Arguments of `python -m lenvm_rl.demo measure` (see [`measure_demo_policy`])."""

    world_dir: str = field(metadata={"help": "A world built by `python -m lenvm_rl.demo build`."})
    output_dir: str = field(metadata={"help": "Where demo_policy_stats.json and demo_policy_lengths.png go."})
    num_problems: int = field(default=200, metadata={"help": "Held-out problems to measure on."})
    num_samples: int = field(default=4, metadata={"help": "Sampled completions per problem (temperature 1.0)."})
    max_new_tokens: int = field(default=384, metadata={"help": "Length cap."})
    batch_size: int = field(default=32, metadata={"help": "Rows decoded together."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    num_threads: int = field(default=2, metadata={"help": "torch.set_num_threads while measuring."})


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("build", "measure"):
        raise SystemExit("usage: python -m lenvm_rl.demo {build,measure} [--help] [--config YAML] [flags]")
    command, argv = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if command == "build":
        build_args, config = TrlParser((DemoBuildArguments, DemoWorldConfig)).parse_args_and_config(argv)
        world_dir = build_demo_world(build_args.output_dir, seed=build_args.seed, config=config)
        info = json.loads((world_dir / "build_info.json").read_text())
        print(
            json.dumps({key: info[key] for key in ("fingerprint", "num_parameters", "data_lengths", "build_seconds")})
        )
    else:
        (measure_args,) = TrlParser((DemoMeasureArguments,)).parse_args_and_config(argv)
        stats = measure_demo_policy(**asdict(measure_args))
        print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
