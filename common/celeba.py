"""CelebA's own figures, for the scripts that project onto the full dataset without reading it."""

CELEBA_SPLIT = {"train": 162_770, "val": 19_867, "test": 19_962}  # list_eval_partition.txt's split sizes
