"""A griffe extension for the API reference: Sphinx roles become links.

fedzip's docstrings cite objects as ``:class:`~fedzip.codecs.Codec```,
``:func:`...```, ``:mod:`...``` and the like. Each becomes an *optional*
autorefs cross-reference: a link where the object is in the reference,
plain code where it is not (a standard-library class, a name relative to its
module), never a warning. References written in the guides as
``[text][identifier]`` stay strict.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([^`<>]+)`")


def _link(match: re.Match, module: str) -> str:
    short, target = match.group(1) == "~", match.group(2).strip()
    shown = target.rsplit(".", 1)[-1] if short else target
    if "." not in target and module:
        target = f"{module}.{target}"  # a name relative to the docstring's module
    return (f'<autoref identifier="{html.escape(target)}" optional>'
            f"<code>{html.escape(shown)}</code></autoref>")


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            module = obj.module.path if not obj.is_alias else ""
            obj.docstring.value = _ROLE.sub(lambda m: _link(m, module), obj.docstring.value)
