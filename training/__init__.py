"""Model training: the TensorFlow profile model and the XGBoost uplift response model.

Submodules import their heavy libraries lazily, so importing this package is fast.
"""
