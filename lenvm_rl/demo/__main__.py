"""Command line of the demo world: build it, then measure its policy.

    python -m lenvm_rl.demo build --output_dir outputs/demo/world --seed 0
    python -m lenvm_rl.demo measure --world_dir outputs/demo/world --output_dir outputs/demo

`build` takes every field of [`~lenvm_rl.demo.DemoWorldConfig`] as a flag (`--rebuild` trains the policy instead
of copying the shipped one); `measure` prints each checked figure next to its expected range; `ship` makes a
rebuilt world's policy the shipped one (maintainers, see `shipped.py`). All take `--config YAML`.
"""

import json
import logging
import sys
from dataclasses import asdict, dataclass, field

from trl import TrlParser

from .measure import measure_demo_policy
from .shipped import DEMO_ASSETS_DIR, format_demo_check, ship_demo_policy
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


@dataclass
class DemoShipArguments:
    """Arguments of `python -m lenvm_rl.demo ship` (see [`~lenvm_rl.demo.shipped.ship_demo_policy`])."""

    world_dir: str = field(metadata={"help": "A world built with `python -m lenvm_rl.demo build --rebuild`."})
    stats_files: list[str] = field(
        metadata={"help": "demo_policy_stats.json of measure runs of its policy (same settings, several seeds)."}
    )
    assets_dir: str = field(
        default=str(DEMO_ASSETS_DIR), metadata={"help": "Where policy/ and manifest.json go (replaced)."}
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("build", "measure", "ship"):
        raise SystemExit("usage: python -m lenvm_rl.demo {build,measure,ship} [--help] [--config YAML] [flags]")
    command, argv = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if command == "build":
        build_args, config = TrlParser((DemoBuildArguments, DemoWorldConfig)).parse_args_and_config(argv)
        world_dir = build_demo_world(build_args.output_dir, seed=build_args.seed, config=config)
        info = json.loads((world_dir / "build_info.json").read_text())
        summary = {key: info[key] for key in ("fingerprint", "num_parameters", "data_lengths", "build_seconds")}
        source = info.get("policy", {"source": "trained"})["source"]  # worlds built before shipping were trained
        print(json.dumps({**summary, "policy": source}))
    elif command == "measure":
        (measure_args,) = TrlParser((DemoMeasureArguments,)).parse_args_and_config(argv)
        stats = measure_demo_policy(**asdict(measure_args))
        print(json.dumps(stats, indent=2))
        print("\n".join(format_demo_check(stats["check"])))
    else:
        (ship_args,) = TrlParser((DemoShipArguments,)).parse_args_and_config(argv)
        manifest = ship_demo_policy(**asdict(ship_args))
        print(json.dumps({key: manifest[key] for key in ("files", "expected")}, indent=2))


if __name__ == "__main__":
    main()
