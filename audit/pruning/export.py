"""What people deploy: a (pruned) model as a `.keras` file, and as a SavedModel for TF Serving, both as bytes a
page can offer for download."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import keras
import tensorflow as tf


def keras_bytes(model: keras.Model) -> bytes:
    """The model as a `.keras` file (architecture, weights; loads in plain Keras)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        model.save(path)
        return path.read_bytes()


def saved_model_zip(model: keras.Model) -> bytes:
    """The model as a zipped SavedModel directory, inference only: its `serve` endpoint takes the image batch
    itself, as TF Serving and `tf.saved_model.load(...).serve(x)` call it (`model.export` gave a legacy `.h5`
    model, whose inputs are a list, the signature `serve([x])`)."""
    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), model.inputs[0].dtype, name="images")
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", lambda images: model(images, training=False), input_signature=[spec])
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "saved_model"
        archive.write_out(str(root), verbose=False)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(root.rglob("*")):
                if path.is_file():
                    archive.write(path, Path("saved_model") / path.relative_to(root))
        return buffer.getvalue()
