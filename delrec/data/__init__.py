"""Data layer: loaders per format, preprocessing, the prepared dataset folder."""
