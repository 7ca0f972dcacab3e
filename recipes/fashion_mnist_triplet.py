"""ConvNet on Fashion-MNIST with a triplet loss and semi-hard mining (64-D embedding).

Five epochs reach test precision@1 0.903 and MAP@R 0.832 (leave-one-out on the 10k test set, cosine;
seed 0), against 0.890 and 0.799 at a constant lr of 1e-3: a cosine decay from 3e-3 after a short warm-up.

The full 60k/10k Fashion-MNIST is found in /usr/share/datasets/fashion-mnist on Debian
(`apt-get install dataset-fashion-mnist`), in --data-dir, or downloaded.

    python recipes/fashion_mnist_triplet.py --epochs 1
    accelerate launch recipes/fashion_mnist_triplet.py
"""

from metriclab import Recipe, main

recipe = Recipe(
    name="fashion_mnist_triplet",
    dataset="fashion-mnist",
    encoder="convnet",
    embedding_dim=64,
    loss="triplet",
    loss_args={"margin": 0.2},
    miner="semi-hard",
    miner_args={"margin": 0.2},
    metric="cosine",  # the triplet loss compares L2-normalised embeddings; evaluate the same way
    optimizer="adam",
    lr=3e-3,
    scheduler="cosine",  # after a linear warm-up, decays to 0 at the end of the last epoch
    warmup_steps=50,
    batch_size=256,
    epochs=5,
    mixed_precision="auto",  # bf16 where the GPU or CPU computes it natively (same precision@1, half the time)
)

if __name__ == "__main__":
    main(recipe)
