"""vidray: Ray-distributed training and tuning of VideoMAE video classifiers."""

__version__ = "0.1.0"
