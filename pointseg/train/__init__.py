"""Stage-2 training pieces usable in a plain PyTorch loop: targets, augmentation, collates, steps."""
