"""Metric learning on your own photos: a folder of class folders, or a CSV in open-metric-learning's format.

    python recipes/image_folder.py --dataset image-folder --data-dir DIR
    python recipes/image_folder.py --dataset csv --data-dir FILE.csv
    accelerate launch recipes/image_folder.py --dataset image-folder --data-dir DIR --image-size 224

Images are decoded and augmented in DataLoader workers (``--num-workers``), never all in memory.
The protocol is class-disjoint (zero-shot): by default ``image-folder`` trains on the first half of
the sorted class folders and tests on the rest (``--dataset-args split=images`` splits each class's
images instead, ``train_fraction=0.5`` sets the cut); a CSV says which rows are ``train`` and which
``validation``, and, with ``is_query``/``is_gallery``, ``metriclab evaluate`` searches its queries in
its gallery (In-Shop). Unreadable images stop the run before training with one line each; pass
``--dataset-args skip_unreadable=true`` to train without them (config.json lists them).

Laying out the standard benchmarks (class-disjoint, as in the papers):

- CUB-200-2011: ``CUB_200_2011/images`` already holds ``001.Black_footed_Albatross/ ... 200.*/``;
  ``--data-dir CUB_200_2011/images`` trains on classes 1-100 and tests on 101-200.
- Cars196: sort the images into ``cars196/001/ ... 196/`` by the class id of ``cars_annos.mat``
  (zero-padded, so the sorted order is the id order); classes 1-98 train, 99-196 test.
- Stanford Online Products: write a CSV from ``Ebay_train.txt`` (split ``train``) and ``Ebay_test.txt``
  (split ``validation``) with ``label`` = class_id, ``path`` = the path column, ``category`` = super_class_id;
  11,318 classes train, 11,316 test. In-Shop: ``is_query``/``is_gallery`` from ``list_eval_partition.txt``.

Numbers to compare with, all at 224 px with ImageNet-scale pretrained backbones (far beyond this recipe's
small ConvNet trained from scratch; use them as the ceiling, not as a target for ``--encoder convnet``):
open-metric-learning's README (Zoo, https://github.com/OML-Team/open-metric-learning) reports CMC@1
(= our precision@1) of ViT-S/16 fine-tuned with OML: CUB 0.837, Cars196 0.907, SOP 0.830, In-Shop 0.903,
and of the same ViT-S/16 DINO weights without fine-tuning: CUB 0.693, Cars196 0.313, SOP 0.629, In-Shop 0.456.
Teh et al., "ProxyNCA++" (ECCV 2020), report Recall@1 of 72.2 (CUB), 90.1 (Cars196), 81.4 (SOP),
90.9 (In-Shop). Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020) compare losses under one
protocol with precision@1, R-precision and MAP@R, the metrics ``metriclab evaluate`` reports.
"""

from metriclab import Recipe, main

recipe = Recipe(
    name="image_folder",
    dataset="image-folder",
    image_size=64,  # small enough to train on a CPU; none: a pretrained backbone's own size (224 for the papers)
    train_transform="random-resized-crop",
    test_transform="resize-center-crop",
    num_workers=2,
    encoder="convnet",  # --encoder resnet18 for more capacity (and time)
    embedding_dim=128,
    loss="triplet",
    loss_args={"margin": 0.2},
    miner="semi-hard",
    miner_args={"margin": 0.2},
    metric="cosine",
    sampler="m-per-class",  # every batch holds whole groups of 4 images per class: positives for every anchor
    m_per_class=4,
    optimizer="adam",
    lr=3e-4,
    batch_size=64,
    epochs=20,
)

if __name__ == "__main__":
    main(recipe)
