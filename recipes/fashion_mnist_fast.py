"""Fashion-MNIST towards a test precision@1 of 0.85 in few training seconds (64-D, cosine).

The reference recipe's ConvNet (recipes/fashion_mnist_triplet.py) with
- a proxy loss (pytorch-metric-learning's NormalizedSoftmaxLoss: cosine to one learned proxy per class,
  temperature 0.05) instead of triplets: every sample gets a gradient on every step, and nothing is mined;
- one epoch under a short linear warm-up and a cosine decay to zero, so the last steps settle the
  embedding instead of jumping around it;
- bfloat16 autocast where the device computes it natively (``mixed_precision="auto"``: GPUs, and CPUs with
  AMX or AVX512-BF16, where a step takes half the time at the same precision@1 per step).
Measured per step (seed 0, leave-one-out, cosine): 0.800 / 0.837 / 0.854 / 0.856 at steps 25 / 75 / 100 / 125:
0.85 after about 25,000 samples, where the reference needs 30,000-60,000. `python bench/run.py --only ttq`
times both recipes and pytorch-metric-learning's loop to 0.85.

    python recipes/fashion_mnist_fast.py
"""

from metriclab import Recipe, main

recipe = Recipe(
    name="fashion_mnist_fast",
    dataset="fashion-mnist",
    encoder="convnet",
    embedding_dim=64,
    loss="pml.NormalizedSoftmaxLoss",
    loss_args={"temperature": 0.05},
    miner=None,
    metric="cosine",
    optimizer="adam",
    lr=3e-3,
    batch_size=256,
    epochs=1,
    scheduler="cosine",
    warmup_steps=20,
    mixed_precision="auto",
)

if __name__ == "__main__":
    main(recipe)
