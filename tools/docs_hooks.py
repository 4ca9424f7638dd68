"""Build-time helpers of the documentation site (`mkdocs.yml`): nothing here is part of the package.

- `on_files` (an MkDocs hook): the site's home page is the repository's README.md, with its `docs/...` links made
  relative to the site, so the front page has one source.
- `TRLDocstrings` (a griffe extension): the package's docstrings follow TRL's format, which the Google-style parser
  of mkdocstrings does not know. It turns cross-references such as [`~lenvm_rl.core.compute_gae`] into links of the
  API reference (plain code when the target is not documented), the `> group` lines and the entries that name several
  parameters at once into paragraphs between `Parameters:` sections, and TRL's parameter types
  (`` (`int`, *optional*, defaults to `1`) ``) into plain ones (the reference takes the default from the signature).
"""

import ast
import re
from pathlib import Path

import griffe
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------------------------
# MkDocs hook


def readme_as_home_page(readme: str) -> str:
    """README.md -> the site's index.md: links into `docs/` become site-relative, and the page gives the table of
    contents' column to the results table."""
    return "---\nhide:\n  - toc\n---\n\n" + re.sub(r"\]\(docs/", "](", readme)


def on_files(files, config):
    readme = (ROOT / "README.md").read_text()
    files.append(File.generated(config, "index.md", content=readme_as_home_page(readme)))
    return files


# ------------------------------------------------------------------------------------------------------------------
# griffe extension

HF_REF = re.compile(r"\[`(~?)([\w.]+)`\](?![\[(])")
SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Params|Returns|Raises|Example|Examples|Note|Notes):\s*$")


def _public_names() -> set[str]:
    """`lenvm_rl.__all__`, read from the source (the build does not import the package and its torch)."""
    source = (ROOT / "lenvm_rl" / "__init__.py").read_text()
    match = re.search(r"^__all__ = (\[.*?\])", source, flags=re.S | re.M)
    return set(ast.literal_eval(match.group(1)))


PUBLIC = _public_names()


def resolve_reference(name: str, module: str) -> str:
    """The documented identifier a TRL-style reference points to."""
    if name.split(".")[0] in PUBLIC:  # `LengthValueModel.save_pretrained`: a member of a public name
        return f"lenvm_rl.{name}"
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
    out, header, quote, names, closed = [], None, [], None, False

    def paragraph(text: str, bold: bool) -> None:
        nonlocal closed
        if not closed and out and out[-1].strip() == f"{header[1]}:":
            out.pop()  # the section opened with the paragraph: it reopens after
        out.extend(["", f"{header[0]}**{text}**" if bold else f"{header[0]}{text}", ""])
        closed = True

    def flush_quote():
        if quote:
            paragraph(" ".join(quote), bold=len(quote) == 1)
            quote.clear()

    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if header is not None and stripped and indent <= len(header[0]):
            flush_quote()
            header = None  # back at the docstring's own indentation: the section ended
        match = SECTION.match(line)
        if match:
            header, entry_indent, closed = (match.group(1), match.group(2)), None, False
            out.append(line)
            continue
        if header is None or header[1] not in ("Args", "Arguments", "Parameters", "Params"):
            out.append(line)
            continue
        entry_indent = entry_indent if entry_indent is not None else (indent if stripped else None)
        if names is not None:  # the names continue up to a colon, then the shared description follows
            if ":" not in " ".join(names) or (stripped and indent > entry_indent):
                names.append(stripped)
                continue
            paragraph(_names_paragraph(names), bold=False)
            names = None
        if stripped.startswith(">") and not stripped.startswith(">>>"):
            quote.append(stripped.lstrip(">").strip())
            continue
        flush_quote()
        if indent == entry_indent and MULTI_NAME.match(stripped):
            names = [stripped]
            continue
        if stripped and closed:
            out.append(f"{header[0]}{header[1]}:")
            closed = False
        out.append(line)
    if names is not None:
        paragraph(_names_paragraph(names), bold=False)
    if header is not None:
        flush_quote()
    return "\n".join(out)


ENTRY = re.compile(r"^(\s*)([\w*]+) \((.+)\):(.*)$")


def plain_annotation(annotation: str) -> str:
    """TRL's `(`str` or `None`, *optional*, defaults to `None`)` -> `str or None`: the reference shows the default
    from the signature, and the type without markup."""
    annotation = re.split(r",\s*\*optional\*|,\s*defaults to", annotation)[0]
    annotation = HF_REF.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), annotation)
    return annotation.replace("`", "").replace("*", "").strip()


def plain_entries(text: str) -> str:
    out, section = [], None
    for line in text.splitlines():
        match = SECTION.match(line)
        if match:
            section = match.group(2)
        elif line.strip() and not line.startswith((" ", "\t")):
            section = None
        entry = ENTRY.match(line)
        if entry and section in ("Args", "Arguments", "Parameters", "Params"):
            indent, name, annotation, rest = entry.groups()
            line = f"{indent}{name} ({plain_annotation(annotation)}):{rest}"
        out.append(line)
    return "\n".join(out)


class TRLDocstrings(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is None:
            return
        module = obj.module.path if obj.is_module is False else obj.path
        text = re.sub(r"^(\s*)Example:\s*$", r"\1Examples:", obj.docstring.value, flags=re.M)
        obj.docstring.value = convert_references(plain_entries(split_parameter_groups(text)), module)
