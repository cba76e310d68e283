"""Datasets: finding them, reading their records, encoding and batching them."""
