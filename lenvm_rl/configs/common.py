"""What the script-argument dataclasses share."""

__all__ = ["null_to_none"]


def null_to_none(args, *names: str) -> None:
    """Read `--instruction null` as None: on the command line it arrives as the string "null" (`null` in a YAML
    config already arrives as None), and the help of these fields promises that null disables them."""
    for name in names:
        value = getattr(args, name)
        if isinstance(value, str) and value.strip().lower() in ("null", "none"):
            setattr(args, name, None)
