"""Train a demo CNN on generated shapes and save its weights: `python -m audit.zoo.train [--head gap]`.

Seeded and deterministic, so the committed weights can be reproduced. Images are generated with
seed 1 (training) and 2 (validation); the test in tests/test_zoo.py uses seed 12345, never seen here.
"""

import argparse
import time

import keras
import numpy as np
import tensorflow as tf

from audit.zoo import shapes
from audit.zoo.model import HEADS, WEIGHTS, build_model

TRAIN_SEED, VALIDATION_SEED = 1, 2


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flips and quarter turns: shapes keep their class under both."""
    flipped = np.where(rng.random(len(images))[:, None, None, None] < 0.5, images[:, :, ::-1], images)
    turns = rng.integers(0, 4, len(images))
    return np.stack([np.rot90(image, k) for image, k in zip(flipped, turns)])


def scale(images: np.ndarray) -> np.ndarray:
    """uint8 to the model's [-1, 1] input (the "tf" preprocessing of audit.images)."""
    return images / np.float32(127.5) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=14000)
    parser.add_argument("--head", choices=HEADS, default="dense", help="dense: demo:shapes, gap: demo:shapes-gap")
    parser.add_argument("--out", help="weights file (default: the one the demo loads)")
    args = parser.parse_args()
    out = args.out or str(WEIGHTS[args.head])

    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    train = shapes.generate(args.train_size, TRAIN_SEED)
    validation = shapes.generate(1200, VALIDATION_SEED)
    model = build_model(len(shapes.CLASSES), args.head)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    rng = np.random.default_rng(0)
    x_val = scale(validation.images)
    start = time.time()
    for epoch in range(args.epochs):
        if epoch == int(args.epochs * 0.75):
            model.optimizer.learning_rate.assign(2e-4)
        x = scale(augment(train.images, rng))
        model.fit(x, train.labels, batch_size=32, epochs=1, shuffle=True, verbose=0)
        loss, accuracy = model.evaluate(x_val, validation.labels, verbose=0)
        print(f"epoch {epoch + 1}/{args.epochs}: validation accuracy {accuracy:.4f}, loss {loss:.4f} "
              f"({time.time() - start:.0f} s)", flush=True)
    clean = build_model(len(shapes.CLASSES), args.head)  # without the optimizer's state: a third of the size
    clean.set_weights(model.get_weights())
    clean.save_weights(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
