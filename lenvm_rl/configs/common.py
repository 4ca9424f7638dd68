"""What the script-argument dataclasses share."""

from dataclasses import dataclass, field

__all__ = ["RunArguments", "null_to_none"]


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


def null_to_none(args, *names: str) -> None:
    """Read `--instruction null` as None: on the command line it arrives as the string "null" (`null` in a YAML
    config already arrives as None), and the help of these fields promises that null disables them."""
    for name in names:
        value = getattr(args, name)
        if isinstance(value, str) and value.strip().lower() in ("null", "none"):
            setattr(args, name, None)
