"""Stores: where encrypted datasets live and how their partitions are laid out."""
