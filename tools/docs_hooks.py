"""Build-time helpers of the documentation site (`mkdocs.yml`): nothing here is part of the package.

- `on_files` (an MkDocs hook): the site's home page is the repository's README.md, with its `docs/...` links made
  relative to the site, so the front page has one source.
- `TRLDocstrings` (a griffe extension): the package's docstrings follow TRL's format, which the Google-style parser
  of mkdocstrings does not know. It turns cross-references such as [`~lenvm_rl.core.compute_gae`] into links of the
  API reference (plain code when the target is not documented) and the `> group` lines inside a `Parameters:`
  section into plain paragraphs after it.
"""

import re
from pathlib import Path

import griffe
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------------------------
# MkDocs hook


def readme_as_home_page(readme: str) -> str:
    """README.md -> the site's index.md: links into `docs/` become site-relative."""
    return re.sub(r"\]\(docs/", "](", readme)


def on_files(files, config):
    readme = (ROOT / "README.md").read_text()
    files.append(File.generated(config, "index.md", content=readme_as_home_page(readme)))
    return files


# ------------------------------------------------------------------------------------------------------------------
# griffe extension

HF_REF = re.compile(r"\[`(~?)([\w.]+)`\](?![\[(])")
SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Params|Returns|Raises|Example|Examples|Note|Notes):\s*$")


def _public_names() -> set[str]:
    namespace: dict = {}
    source = (ROOT / "lenvm_rl" / "__init__.py").read_text()
    match = re.search(r"^__all__ = (\[.*?\])", source, flags=re.S | re.M)
    if match:
        exec(f"names = {match.group(1)}", namespace)  # a literal list of strings
    return set(namespace.get("names", []))


PUBLIC = _public_names()


def resolve_reference(name: str, module: str) -> str:
    """The documented identifier a TRL-style reference points to."""
    if "." in name:
        return name
    if name in PUBLIC:
        return f"lenvm_rl.{name}"
    return f"{module}.{name}"


def convert_references(text: str, module: str) -> str:
    def link(match: re.Match) -> str:
        tilde, name = match.groups()
        title = name.rsplit(".", 1)[-1] if tilde else name
        identifier = resolve_reference(name, module)
        return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

    return HF_REF.sub(link, text)


MULTI_NAME = re.compile(r"^[\w*]+,( [\w*]+,?)*( [\w*]+:)?$")


def _names_paragraph(lines: list[str]) -> str:
    names, description = " ".join(lines).split(":", 1)
    return ", ".join(f"`{name.strip()}`" for name in names.split(",") if name.strip()) + ":" + description


def split_parameter_groups(text: str) -> str:
    """TRL's `Parameters:` sections hold what the Google-style parser reads as broken entries: `> heading` lines
    grouping the fields, and entries naming several parameters at once (`model, args, ...:` + one description).
    Each of those ends the section and becomes a paragraph of its own; the entries after it open a new section."""
    out, header, quote, names = [], None, [], None

    def flush_quote():
        if quote:
            text = " ".join(quote)
            bold = len(quote) == 1 and not text.startswith("`")
            out.extend(["", f"{header[0]}**{text}**" if bold else f"{header[0]}{text}", ""])
            quote.clear()

    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if header is not None and stripped and indent <= len(header[0]):
            flush_quote()
            header = None  # back at the docstring's own indentation: the section ended
        match = SECTION.match(line)
        if match:
            header, entry_indent = (match.group(1), match.group(2)), None
            out.append(line)
            continue
        if header is None or header[1] not in ("Args", "Arguments", "Parameters", "Params"):
            out.append(line)
            continue
        entry_indent = entry_indent if entry_indent is not None else (indent if stripped else None)
        if (stripped.startswith(">") and not stripped.startswith(">>>")) or (
            names is None and indent == entry_indent and MULTI_NAME.match(stripped)
        ):
            if not quote and out and out[-1].strip() == f"{header[1]}:":
                out.pop()  # the section opened with the quote: reopen it after
            if stripped.startswith(">"):
                quote.append(stripped.lstrip(">").strip())
            else:
                names = [stripped]
            continue
        if names is not None:  # the names continue up to a colon, then the shared description follows
            if ":" not in " ".join(names) or (stripped and indent > entry_indent):
                names.append(stripped)
                continue
            quote.append(_names_paragraph(names))
            names = None
        if stripped and quote:
            flush_quote()
            out.append(f"{header[0]}{header[1]}:")
        out.append(line)
    if names is not None:
        quote.append(_names_paragraph(names))
    if header is not None:
        flush_quote()
    return "\n".join(out)


class TRLDocstrings(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is None:
            return
        module = obj.module.path if obj.is_module is False else obj.path
        text = re.sub(r"^(\s*)Example:\s*$", r"\1Examples:", obj.docstring.value, flags=re.M)
        obj.docstring.value = convert_references(split_parameter_groups(text), module)
