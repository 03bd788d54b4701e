"""Bytes on disk: readers, writers, the streaming engine that runs a plan, crash-safe directory
replacement, where a SOURCE argument points. Imports `model` and `plans`."""
