"""The conv Siamese network of the TensorFlow MNIST example, with its contrastive loss.

One shared-weight tower of five convolutions, 7x7x32, 5x5x64, 3x3x128, 1x1x256, 1x1x2 ('same'
padding, ReLU except after the last, Xavier-initialised), each followed by 2x2 max-pooling, maps a
28x28 digit to a point in the plane. The loss is the example's non-squared contrastive form,
y*d + (1-y)*max(0, margin - d) with margin 5, on balanced random pairs of each batch; the optimizer is
the example's SGD with Nesterov momentum 0.99 at lr 0.01.

    python recipes/mnist_siamese_conv.py
    python recipes/mnist_siamese_conv.py --loss-args squared=true    # Hadsell et al.'s squared form
    accelerate launch recipes/mnist_siamese_conv.py --epochs 5
"""

from metriclab import Recipe, main

recipe = Recipe(
    name="mnist_siamese_conv",
    dataset="mnist",
    encoder="siamese-conv",
    embedding_dim=2,
    loss="contrastive",
    loss_args={"margin": 5.0, "squared": False},
    miner="random-pairs",
    miner_args={"pos_fraction": 0.5, "pairs_per_sample": 2},
    optimizer="sgd",
    optimizer_args={"momentum": 0.99, "nesterov": True},
    lr=0.01,
    batch_size=128,
    epochs=10,
)

if __name__ == "__main__":
    main(recipe)
