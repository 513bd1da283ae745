"""Griffe extension for the documentation site: the library's docstrings as Markdown.

The docstrings are Google style with a few reStructuredText parts, written for ``help()`` and
Sphinx-literate readers. Before mkdocstrings parses them, this extension rewrites those parts:

- ``:func:`gald.fuse``` (and ``:class:``, ``:meth:``, ``:attr:``, ``:data:``, ``:mod:``,
  ``:exc:``, ``:obj:``) becomes a cross-reference when it names a public object of the library
  (resolved from the scope of the docstring, as Sphinx does), else inline code. A reference to a
  public object that the site does not document is left to mkdocs-autorefs, which warns, so a
  strict build fails on it.
- ``:math:`x``` becomes ``$x$``; a ``.. math::`` block becomes a ``$$`` block.
- ``.. note::`` / ``.. warning::`` / ... become admonitions.
- A simple table (``===  ===`` borders) becomes a Markdown table.
- A paragraph ending in ``::`` introduces a literal block, which becomes a fenced code block;
  a doctest block (``>>>`` lines and their output, up to a blank or less indented line)
  becomes a fenced ``pycon`` block; a block fenced already is left as it is.
- A Google item naming several attributes or arguments at once (``low, high: ...``) becomes one
  item per name with the shared description.

It also warns (a failed strict build) for every public name without a docstring: every name in
the ``__all__`` of the root package, of the modules it exports, and of ``extra_modules``.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_logger = griffe.get_logger("gald.docs")

_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|exc|obj|const):`(~?)([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\.\s+(?P<name>[\w-]+)::\s*(?P<arg>.*)$")
_ADMONITIONS = {
    "note",
    "warning",
    "tip",
    "important",
    "hint",
    "caution",
    "danger",
    "attention",
    "seealso",
}
_ITEM_SECTIONS = re.compile(
    r"^(?P<indent>\s*)(Args|Arguments|Parameters|Params|Attributes|Keyword Args|"
    r"Keyword Arguments|Other Parameters):\s*$"
)
_GROUPED_ITEM = re.compile(r"^(?P<indent>\s*)(?P<names>\w+(?:\s*,\s*\w+)+)\s*:(?P<rest>\s.*|)$")


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the block that starts at ``start``: blank lines or lines indented > ``indent``."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent_of(lines[end]) > indent):
        end += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return end


def _reindent(block: list[str], indent: int) -> list[str]:
    body = textwrap.dedent("\n".join(block)).split("\n")
    return [(" " * indent + line) if line.strip() else "" for line in body]


def _separated(out: list[str], block: list[str], lines: list[str], end: int) -> list[str]:
    """``block`` with a blank line before and after where its neighbours are not blank."""
    before = [""] if out and out[-1].strip() else []
    after = [""] if end < len(lines) and lines[end].strip() else []
    return before + block + after


_TABLE_BORDER = re.compile(r"^(?P<indent>\s*)=+(?: +=+)+\s*$")


def _simple_table(lines: list[str], start: int) -> tuple[list[str], int] | None:
    """A reStructuredText simple table at ``lines[start]`` as a Markdown table, and its end."""
    border = _TABLE_BORDER.match(lines[start])
    if border is None:
        return None
    spans = [(m.start(), m.end()) for m in re.finditer(r"=+", lines[start])]
    borders = [start]
    i = start + 1
    while i < len(lines) and len(borders) < 3:
        if not lines[i].strip():
            return None
        if lines[i].strip() == lines[start].strip():
            borders.append(i)
        i += 1
    if len(borders) < 3:
        return None

    def cells(line: str) -> list[str]:
        starts = [a for a, _ in spans]
        ends = [a for a, _ in spans[1:]] + [len(line)]
        return [line[a:b].strip() for a, b in zip(starts, ends, strict=True)]

    def rows(first: int, last: int) -> list[list[str]]:
        found: list[list[str]] = []
        for line in lines[first:last]:
            row = cells(line)
            if found and not row[0]:  # a blank first column continues the row above
                found[-1] = [f"{a} {b}".strip() for a, b in zip(found[-1], row, strict=True)]
            else:
                found.append(row)
        return found

    pad = border.group("indent")
    header = rows(borders[0] + 1, borders[1])
    body = rows(borders[1] + 1, borders[2])
    table = [pad + "| " + " | ".join(header[0]) + " |", pad + "|" + "---|" * len(spans)]
    table += [pad + "| " + " | ".join(row) + " |" for row in header[1:] + body]
    return table, borders[2] + 1


def _convert_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        table = _simple_table(lines, i)
        if table is not None:
            out += _separated(out, table[0], lines, table[1])
            i = table[1]
            continue
        m = _DIRECTIVE.match(line)
        if m and m.group("name") in ({"math"} | _ADMONITIONS):
            indent = len(m.group("indent"))
            end = _block_end(lines, i + 1, indent)
            body = [ln for ln in lines[i + 1 : end]]
            while body and not body[0].strip():
                body.pop(0)
            pad = " " * indent
            if m.group("name") == "math":
                formula = ([m.group("arg")] if m.group("arg").strip() else []) + _reindent(
                    body, indent
                )
                block = [pad + "$$", *formula, pad + "$$"]
            else:
                kind = "info" if m.group("name") == "seealso" else m.group("name")
                first = [m.group("arg")] if m.group("arg").strip() else []
                block = [f"{pad}!!! {kind}", *_reindent(first + body, indent + 4)]
            out += _separated(out, block, lines, end)
            i = end
            continue
        if line.lstrip().startswith("```"):  # a fenced block: copied as it is
            end = i + 1
            while end < len(lines) and not lines[end].lstrip().startswith("```"):
                end += 1
            out += lines[i : end + 1]
            i = end + 1
            continue
        if line.lstrip().startswith(">>>"):  # a doctest block: to a blank or less indented line
            indent = _indent_of(line)
            end = i
            while end < len(lines) and lines[end].strip() and _indent_of(lines[end]) >= indent:
                end += 1
            fence = " " * indent
            code = [fence + "```pycon", *_reindent(lines[i:end], indent), fence + "```"]
            if out and re.fullmatch(r"\s*\w+:", out[-1]):  # "Example:": a Google section
                out += code + ([""] if end < len(lines) and lines[end].strip() else [])
            else:
                out += _separated(out, code, lines, end)
            i = end
            continue
        if line.rstrip().endswith("::") and not line.strip().startswith(".."):
            indent = _indent_of(line)
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and _indent_of(lines[j]) > indent:
                end = _block_end(lines, j, indent)
                stripped = line.rstrip()[:-2].rstrip()
                header = re.fullmatch(r"\s*\w+", stripped) is not None  # "Example::" -> a section
                fence_indent = _indent_of(lines[j]) if header else indent
                fence = " " * fence_indent
                if stripped.strip():
                    out.append(stripped + ":")
                code = [fence + "```python", *_reindent(lines[j:end], fence_indent), fence + "```"]
                if header:  # a Google section: its content starts on the next line
                    out += code + ([""] if end < len(lines) and lines[end].strip() else [])
                else:
                    out += _separated(out, code, lines, end)
                i = end
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _split_grouped_items(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    section_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        sec = _ITEM_SECTIONS.match(line)
        if sec:
            section_indent = len(sec.group("indent"))
            out.append(line)
            i += 1
            continue
        if section_indent is not None and line.strip() and _indent_of(line) <= section_indent:
            section_indent = None
        m = _GROUPED_ITEM.match(line) if section_indent is not None else None
        if m and _indent_of(line) > (section_indent or 0):
            item_indent = _indent_of(line)
            end = i + 1
            while end < len(lines) and lines[end].strip() and _indent_of(lines[end]) > item_indent:
                end += 1
            cont = lines[i + 1 : end]
            for name in (n.strip() for n in m.group("names").split(",")):
                out.append(f"{m.group('indent')}{name}:{m.group('rest')}")
                out += cont
            i = end
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _is_private(path: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in path.split("."))


def _lookup(scope: griffe.Object, dotted: str) -> griffe.Object | griffe.Alias | None:
    """The object ``dotted`` names from ``scope`` (its members, then its parents' members)."""
    first, _, rest = dotted.partition(".")
    current: griffe.Object | None = scope
    while current is not None:
        if first in current.all_members:
            try:
                found = current.all_members[first]
                return found[rest] if rest else found
            except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                return None
        current = current.parent
    return None


def _canonical(found: Any) -> str | None:
    try:
        return str(found.final_target.path if found.is_alias else found.path)
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _reference(obj: griffe.Object, written: str, title: str, root: griffe.Module) -> str:
    """Markdown for a reference to ``written`` from the docstring of ``obj``.

    A full public path of the library (``gald.fuse``) must resolve on the site: it becomes a plain
    autorefs link, which fails a strict build when nothing documents it. A name relative to the
    docstring's scope (``set_grad_checkpointing``, ``DilatedResNet``) becomes an optional link to
    the object it names, shown as code where the site does not document that object. Anything
    else (``torch.nn.Conv2d``) is inline code.
    """
    written = written.strip().removesuffix("()")
    code = f"`{title}`"
    if written.startswith(root.name + ".") and not _is_private(written):
        return f"[{code}][{written}]"
    found = _lookup(obj, written)
    target = _canonical(found) if found is not None else None
    if target is None:
        return code
    return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'


def _convert_roles(text: str, obj: griffe.Object, root: griffe.Module) -> str:
    def role(m: re.Match[str]) -> str:
        written = m.group(2).strip().removesuffix("()")
        title = written.rsplit(".", 1)[-1] if m.group(1) else written
        return _reference(obj, written, title, root)

    text = _MATH_ROLE.sub(lambda m: f"${m.group(1).strip()}$", text)
    return _ROLE.sub(role, text)


def to_markdown(text: str, obj: griffe.Object, root: griffe.Module) -> str:
    """The docstring ``text`` of ``obj`` with its reStructuredText parts rewritten as Markdown."""
    return _convert_roles(_split_grouped_items(_convert_blocks(text)), obj, root)


class RstDocstrings(griffe.Extension):
    """Rewrite reStructuredText parts of docstrings and warn about undocumented public names."""

    def __init__(self, extra_modules: list[str] | None = None) -> None:
        super().__init__()
        self.extra_modules = list(extra_modules or [])

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = to_markdown(obj.docstring.value, obj, pkg)
        self._check_public_docstrings(pkg)

    def _check_public_docstrings(self, pkg: griffe.Module) -> None:
        modules: list[griffe.Module] = [pkg]
        for name in pkg.exports or ():
            member = pkg.all_members.get(name) if isinstance(name, str) else None
            if member is not None and member.is_module:
                modules.append(member.final_target if member.is_alias else member)
        for path in self.extra_modules:
            modules.append(pkg[path.removeprefix(pkg.name + ".")])
        for module in modules:
            if module.docstring is None:
                _logger.warning("public module %s has no docstring", module.path)
            for name in module.exports or ():
                if not isinstance(name, str) or (name.startswith("__") and name.endswith("__")):
                    continue
                member = module.all_members.get(name)
                if member is None:
                    _logger.warning(
                        "%s.__all__ lists %s, which it does not define", module.path, name
                    )
                    continue
                target = member.final_target if member.is_alias else member
                if target.docstring is None or not target.docstring.value.strip():
                    _logger.warning("public name %s.%s has no docstring", module.path, name)


def _walk(obj: griffe.Object) -> list[griffe.Object]:
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias:
            found += _walk(member)
    return found
