"""The reference training the imgcls recipes are measured against: the classic Keras MNIST CNN.

conv32(3x3, relu) -> maxpool2 -> conv64(3x3, relu) -> maxpool2 -> flatten -> dense64(relu)
-> dense10(softmax); Adam (Keras defaults, lr 1e-3), sparse categorical cross-entropy,
batch 32, 10 epochs, inputs scaled to [0, 1], trained on all 60,000 training images.

Runs only in the separate benchmark environment (``make bench-env``; TensorFlow is never a
dependency of imgcls):

    .bench-env/bin/python bench/keras_reference.py --data ../shared/data/mnist.npz

Prints one JSON object: training wall time (the sum of the ``fit`` epochs, excluding the
per-epoch test evaluation) and test accuracy after every epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/mnist.npz", help="Keras-layout mnist.npz")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf
    from tensorflow import keras

    keras.utils.set_random_seed(args.seed)
    with np.load(args.data) as d:
        x_train, y_train = d["x_train"], d["y_train"]
        x_test, y_test = d["x_test"], d["y_test"]
    x_train = (x_train.astype("float32") / 255.0)[..., None]
    x_test = (x_test.astype("float32") / 255.0)[..., None]

    model = keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(64, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    epochs = []
    train_time = 0.0
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        h = model.fit(x_train, y_train, batch_size=args.batch_size, epochs=1, verbose=0, shuffle=True)
        dt = time.perf_counter() - t0
        train_time += dt
        _, acc = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
        epochs.append({"epoch": epoch, "epoch_time_s": round(dt, 2), "train_time_s": round(train_time, 2),
                       "train_loss": round(float(h.history["loss"][0]), 5), "test_accuracy": round(float(acc), 5)})
        print(json.dumps(epochs[-1]), flush=True, file=__import__("sys").stderr)

    print(json.dumps({
        "tool": "keras", "recipe": "reference", "model": "reference_cnn", "epochs": args.epochs,
        "batch_size": args.batch_size, "train_time_s": round(train_time, 2),
        "test_accuracy": epochs[-1]["test_accuracy"], "peak_test_accuracy": max(e["test_accuracy"] for e in epochs),
        "params": int(model.count_params()), "per_epoch": epochs,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version()},
    }))


if __name__ == "__main__":
    main()
