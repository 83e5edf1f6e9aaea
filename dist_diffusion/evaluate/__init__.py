"""Distributed sampling and evaluation: sample shards, feature statistics, FID / IS / accuracy."""
