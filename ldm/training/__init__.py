"""What the training scripts in train/ share: starting a run, its command line, its logs and trackers,
non-finite steps, EMA weights in and out."""
