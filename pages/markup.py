"""User-supplied text (file, member, class, layer and model names, and messages that quote them) made safe to
put in Streamlit's markdown: a zip member named `![t](http://host/x.png)` must read as those characters, not
make every viewer's browser fetch that address."""

import re

_MARKDOWN = re.compile(r"([\\`\[\]()!<>$])")


def escape(text) -> str:
    """The text with the characters that make links, images, HTML, code and formulas backslash-escaped, and line
    breaks made spaces (emphasis characters stay: `block1_conv1` reads as it is, and a stray `*` fetches nothing)."""
    return _MARKDOWN.sub(r"\\\1", " ".join(str(text).split()))
