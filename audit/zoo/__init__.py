"""The demo model: a small VGG-style CNN trained on generated shapes whose masks are known."""
