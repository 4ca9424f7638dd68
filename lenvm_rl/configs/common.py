"""What the script-argument dataclasses share."""

from dataclasses import dataclass, field

__all__ = ["RunArguments", "check_at_least", "null_to_none"]


@dataclass(kw_only=True)
class RunArguments:
    """
    What a recipe does with an output directory that already holds a run ([`~lenvm_rl.run_manifest.start_run`]). The
    same run resumes, a finished one is left as it is, a different one is refused unless moved aside.

    Parameters:
        overwrite_output_dir (`bool`): Move a different run (or files of no run) found in `output_dir` into
            `output_dir/superseded/<time>-<job>/` and start anew, instead of refusing. Nothing is deleted.
        reevaluate (`bool`): For a run that already finished in `output_dir`, run its evaluation again (the
            trained weights are not touched).
    """

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Move a different run found in output_dir into output_dir/superseded/ and start anew (nothing "
            "is deleted), instead of refusing."
        },
    )
    reevaluate: bool = field(
        default=False, metadata={"help": "For a run that already finished in output_dir, run its evaluation again."}
    )


def check_at_least(args, minimum: int, *names: str) -> None:
    """Refuse a size or count below `minimum` with a `ValueError` naming its flag (`None`, where a field allows it,
    means "all" or "the default" and passes): 0 prompts, rows or chunks would fail later with an error naming
    neither (`ZeroDivisionError`, `range() arg 3 must not be zero`) or train on nothing."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name} must be at least {minimum}, got {value}.")


def null_to_none(args, *names: str) -> None:
    """Read `--instruction null` as None: on the command line it arrives as the string "null" (`null` in a YAML
    config already arrives as None), and the help of these fields promises that null disables them."""
    for name in names:
        value = getattr(args, name)
        if isinstance(value, str) and value.strip().lower() in ("null", "none"):
            setattr(args, name, None)
