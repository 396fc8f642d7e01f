"""Data: the kaggle_3m reader, splits, caching, transforms and the DataModule."""
