"""What people deploy: a (pruned) model as a `.keras` file, and as a SavedModel for TF Serving, both as bytes a
page can offer for download."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import keras


def keras_bytes(model: keras.Model) -> bytes:
    """The model as a `.keras` file (architecture, weights; loads in plain Keras)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        model.save(path)
        return path.read_bytes()


def saved_model_zip(model: keras.Model) -> bytes:
    """The model as a zipped SavedModel directory (`model.export`: its `serve` endpoint is what TF Serving and
    `tf.saved_model.load(...).serve(x)` call), inference only."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "saved_model"
        model.export(str(root), format="tf_saved_model", verbose=False)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(root.rglob("*")):
                if path.is_file():
                    archive.write(path, Path("saved_model") / path.relative_to(root))
        return buffer.getvalue()
