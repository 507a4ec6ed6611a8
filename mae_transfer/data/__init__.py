"""Datasets: image folders and the built-in synthetic world."""
