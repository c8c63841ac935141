"""Turning a folder of face JPEGs (CelebA's img_align_celeba, or synthetic faces) into shards."""
