"""A griffe extension (mkdocs.yml, mkdocstrings' ``extensions``): the docstrings' Sphinx roles become links.

The docstrings are Google style, with cross-references written the Sphinx way, which reads well in ``help()``:
``:class:`~zimage_turbo.errors.NotEnoughMemoryError```, ``:meth:`generate_many```, ``:mod:`.attention```. Each
is resolved the way Sphinx would (the current class, the module's names and imports, the module and its
packages for a leading dot, then the name as written) and replaced by a cross-reference to that object, shown
as code: a link where the site documents the object, plain code where it does not (internal modules). A role
naming something of zimage_turbo that does not exist is a warning, which ``mkdocs build --strict`` turns into
a failure; names from other packages (``filelock``) are shown as code.

It also drops the ``# doctest: +SKIP`` directives from the examples: they are for pytest, not for readers.
"""

from __future__ import annotations

import builtins
import contextlib
import html
import logging
import re
from collections.abc import Iterator
from typing import Any

from griffe import Extension, GriffeLoader, Module, Object

PACKAGE = "zimage_turbo"

# :role:`target` and :role:`~target`
_ROLE = re.compile(r":(?P<role>class|func|meth|attr|data|mod|exc|obj):`(?P<tilde>~?)(?P<target>[\w.]+)`")

# "  # doctest: +SKIP" at the end of an example's line: for the test runner, not for the reader
_DIRECTIVE = re.compile(r"[ \t]*# doctest: [^\n]*$", re.MULTILINE)

logger = logging.getLogger(f"mkdocs.plugins.{__name__}")


def _walk(obj: Object) -> Iterator[Object]:
    """``obj`` and every object defined in it (imported names are someone else's)."""
    yield obj
    for member in obj.members.values():
        if isinstance(member, Object):
            yield from _walk(member)


def _exists(loader: GriffeLoader, path: str) -> str | None:
    """The canonical path of the object at ``path``, or None if there is none."""
    try:
        found = loader.modules_collection[path]
    except Exception:  # KeyError, or an alias that leads outside the package
        return None
    return str(found.canonical_path)


def _candidates(target: str, obj: Object) -> list[str]:
    module = obj.module
    if target.startswith("."):
        scopes = module.path.split(".")
        return [".".join(scopes[:n]) + target for n in range(len(scopes), 0, -1)]
    found = []
    cls = obj if obj.is_class else obj.parent if obj.parent is not None and obj.parent.is_class else None
    if cls is not None:
        found.append(f"{cls.path}.{target}")
    head, dot, rest = target.partition(".")
    with contextlib.suppress(Exception):  # unless it is not a name in scope
        found.append(obj.resolve(head) + dot + rest)
    found += [f"{module.path}.{target}", target]
    return found


class SphinxRoles(Extension):
    def on_package(self, *, pkg: Module, loader: GriffeLoader, **kwargs: Any) -> None:
        if pkg.path != PACKAGE:
            return
        for obj in _walk(pkg):
            if obj.docstring is None:
                continue

            def link(match: re.Match[str], obj: Object = obj) -> str:
                target, role = match["target"], match["role"]
                title = target.rsplit(".", 1)[-1] if match["tilde"] else target.lstrip(".")
                if role in ("func", "meth"):
                    title += "()"
                candidates = _candidates(target, obj)
                for candidate in candidates:
                    if (path := _exists(loader, candidate)) is not None:
                        return f'<autoref identifier="{path}" optional><code>{html.escape(title)}</code></autoref>'
                if _internal(obj, target):
                    logger.warning("%s: %s names nothing in %s", obj.path, match.group(0), PACKAGE)
                return f"`{title}`"

            obj.docstring.value = _DIRECTIVE.sub("", _ROLE.sub(link, obj.docstring.value))


def _internal(obj: Object, target: str) -> bool:
    """Whether ``target`` is meant as a name of the package (rather than of another package that ``obj``'s
    module imports, such as ``filelock``)."""
    head = target.split(".")[0]
    if not head or head == PACKAGE:
        return True
    try:
        return obj.resolve(head).startswith(f"{PACKAGE}.")
    except Exception:  # not a name in the module's scope: a builtin, a package it imports from, or a typo
        imported = obj.module.imports.values()
        return not (hasattr(builtins, head) or any(path.split(".")[0] == head for path in imported))
