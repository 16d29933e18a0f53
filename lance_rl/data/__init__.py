"""Datasets: the official parquet schema, simple manifests, prompt sets and the synthetic shapes world."""
