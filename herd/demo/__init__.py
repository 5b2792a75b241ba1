"""The tiny demo model's synthetic data and tokenizer (issue 7): seeded, offline, small enough to train on CPU."""
