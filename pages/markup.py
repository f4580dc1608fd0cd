"""User-supplied text (file, member, class, layer and model names, and messages that quote them) made safe to
put in Streamlit's markdown: a zip member named `![t](http://host/x.png)` must read as those characters, not
make every viewer's browser fetch that address."""

import re

_MARKDOWN = re.compile(r"([\\`\[\]()!<>$])")


def escape(text) -> str:
    """The text with the characters that make links, images, HTML, code and formulas backslash-escaped, and line
    breaks made spaces (emphasis characters stay: `block1_conv1` reads as it is, and a stray `*` fetches nothing)."""
    return _MARKDOWN.sub(r"\\\1", " ".join(str(text).split()))


def quoted(text, limit: int = 60) -> str:
    """A value a user or a link gave, quoted for a message: at most `limit` characters (a 100 KB link value
    took 26 s to render) and escaped (a link's `model` value carried an image and a fake sign-in link)."""
    text = str(text)
    return escape(repr(text if len(text) <= limit else text[:limit] + "…"))


def count(number: int, noun: str, plural: str | None = None) -> str:
    """A count in words with its separators and the right number: "1 layer", "2,048 layers"."""
    return f"{number:,} {noun if number == 1 else plural or noun + 's'}"
