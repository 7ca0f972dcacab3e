"""ConvNet on Fashion-MNIST with a triplet loss and semi-hard mining (64-D embedding).

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
    lr=1e-3,
    batch_size=256,
    epochs=5,
)

if __name__ == "__main__":
    main(recipe)
