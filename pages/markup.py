"""User-supplied text (file, member, class, layer and model names, and messages that quote them) made safe to
put in Streamlit's markdown: a zip member named `![t](http://host/x.png)` must read as those characters, not
make every viewer's browser fetch that address."""

import re

_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-!|<>~$])")


def escape(text) -> str:
    """The text with every markdown and HTML character backslash-escaped and line breaks made spaces."""
    return _MARKDOWN.sub(r"\\\1", " ".join(str(text).split()))
