"""Measuring training: `step` runs and times training steps of a built model, `stacks` builds the
stacks benchmarks compare (ftune in each activation-checkpointing mode, with and without its kernels, and
transformers + peft as users set them up). `ftune compare` and every script in benchmarks/ use
them, so that their numbers are measured one way.
"""
