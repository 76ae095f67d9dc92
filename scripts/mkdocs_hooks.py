"""mkdocs hooks (mkdocs.yml: ``hooks``): pages made from files outside docs/, and links that leave docs/.

- ``index.md``, ``changelog.md`` and ``security.md`` are made from README.md, CHANGELOG.md and SECURITY.md, so
  that their text lives in one place and reads the same on GitHub and on the site.
- ``examples/NAME.md`` is made from each notebook ``docs/examples/NAME.ipynb``: its Markdown cells, its code
  cells and the outputs stored in it (the notebook itself is in the site too, to download).
- A relative link to a file outside docs/ (``../benchmarks/results/x.json`` from a page, ``docs/usage.md`` from
  the README) is pointed at the page made from that file, or at a copy of the file in the site under
  ``files/``. A link to a file that does not exist is left as written, for mkdocs' own check to report.
"""

from __future__ import annotations

import base64
import json
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

# root file -> the page made from it
ROOT_PAGES = {"README.md": "index.md", "CHANGELOG.md": "changelog.md", "SECURITY.md": "security.md"}
# where copies of other files that the pages link to go in the site
FILES_PREFIX = "files"

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"(!?\[[^\]\n]*\])\(([^()\s]+)((?:\s+\"[^\"]*\")?)\)")


def _paths(config: MkDocsConfig) -> tuple[Path, Path]:
    root = Path(config.config_file_path).resolve().parent
    return root, Path(config.docs_dir).resolve()


def _site_target(target: Path, root: Path, docs: Path) -> str | None:
    """Where ``target`` (a file of the repository) is in the site, or None if it is not a file we can show."""
    if not target.is_file() or not target.is_relative_to(root):
        return None
    if target.is_relative_to(docs):
        return target.relative_to(docs).as_posix()
    relative = target.relative_to(root).as_posix()
    return ROOT_PAGES.get(relative, f"{FILES_PREFIX}/{relative}")


def _outside_code(text: str) -> Iterator[tuple[bool, str]]:
    """The text in pieces, each with whether it is prose (True) or a fenced code block (False)."""
    start = 0
    for fence in _FENCE.finditer(text):
        yield True, text[start : fence.start()]
        yield False, fence.group(0)
        start = fence.end()
    yield True, text[start:]


def _local(link: str, source: Path) -> tuple[Path, str] | None:
    """The file that ``link``, written in ``source``, points at, and its ``#fragment`` (or ""); None for a
    link that is not a relative path (a web address, an anchor on the same page)."""
    if "://" in link or link.startswith(("#", "/", "mailto:")):
        return None
    path, hash_, fragment = link.partition("#")
    return (source.parent / path).resolve(), hash_ + fragment


def _linked_files(text: str, source: Path) -> Iterator[Path]:
    """The files that the relative links in the prose of ``text`` (the file ``source``) point at."""
    for prose, piece in _outside_code(text):
        for match in _LINK.finditer(piece) if prose else ():
            if (local := _local(match.group(2), source)) is not None:
                yield local[0]


def rewrite_links(text: str, source: Path, page_uri: str, root: Path, docs: Path) -> str:
    """``text`` (the file ``source``, shown as the page ``page_uri``) with its links to files outside docs/
    pointed at where those files are in the site."""

    def repoint(match: re.Match[str]) -> str:
        local = _local(match.group(2), source)
        if local is None:
            return match.group(0)
        target, fragment = local
        where = _site_target(target, root, docs)
        if where is None or (target.is_relative_to(docs) and source.is_relative_to(docs)):
            return match.group(0)  # no such file (mkdocs reports the link), or from docs/ to docs/: right already
        new = posixpath.relpath(where, posixpath.dirname(page_uri) or ".")
        return f"{match.group(1)}({new}{fragment}{match.group(3)})"

    return "".join(_LINK.sub(repoint, piece) if prose else piece for prose, piece in _outside_code(text))


def notebook_markdown(notebook: Path, page_uri: str) -> tuple[str, dict[str, bytes]]:
    """A notebook as a Markdown page, and the images of its outputs (site path -> PNG bytes)."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    stem = posixpath.splitext(page_uri)[0]
    images: dict[str, bytes] = {}
    download = f"[Download the notebook]({notebook.name}), and run it in Jupyter."
    parts = []
    for number, cell in enumerate(cells):
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            parts.append(source)
            if number == 0:
                parts.append(download)  # under the title
            continue
        if cell["cell_type"] != "code":
            continue
        parts.append(f"```python\n{source}\n```")
        for k, output in enumerate(cell.get("outputs", [])):
            kind = output["output_type"]
            if kind == "stream":
                parts.append(f"```text\n{''.join(output['text']).rstrip()}\n```")
            elif kind == "error":
                parts.append("```text\n" + _strip_ansi("\n".join(output["traceback"])) + "\n```")
            else:
                data: dict[str, Any] = output.get("data", {})
                if "image/png" in data:
                    name = f"{posixpath.basename(stem)}_files/cell{number}_{k}.png"
                    images[posixpath.join(posixpath.dirname(page_uri), name)] = base64.b64decode(data["image/png"])
                    parts.append(f"![output of cell {number}]({name})")
                elif "text/markdown" in data:
                    parts.append("".join(data["text/markdown"]))
                elif "text/plain" in data:
                    parts.append(f"```text\n{''.join(data['text/plain'])}\n```")
    return "\n\n".join(parts) + "\n", images


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    root, docs = _paths(config)
    for name, uri in ROOT_PAGES.items():
        text = (root / name).read_text(encoding="utf-8")
        files.append(File.generated(config, uri, content=rewrite_links(text, root / name, uri, root, docs)))
    for notebook in sorted((docs / "examples").glob("*.ipynb")):
        uri = notebook.relative_to(docs).with_suffix(".md").as_posix()
        text, images = notebook_markdown(notebook, uri)
        files.append(File.generated(config, uri, content=text))
        for image_uri, png in images.items():
            files.append(File.generated(config, image_uri, content=png))
    # copies of the other files outside docs/ that a page links to
    sources = [root / name for name in ROOT_PAGES] + sorted(docs.rglob("*.md"))
    copied = set()
    for source in sources:
        for target in _linked_files(source.read_text(encoding="utf-8"), source):
            where = _site_target(target, root, docs)
            if where and where.startswith(f"{FILES_PREFIX}/") and where not in copied:
                copied.add(where)
                files.append(File.generated(config, where, abs_src_path=str(target)))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    if page.file.abs_src_path is None or page.file.generated_by is not None:
        return markdown  # made above, links already right
    root, docs = _paths(config)
    return rewrite_links(markdown, Path(page.file.abs_src_path).resolve(), page.file.src_uri, root, docs)
