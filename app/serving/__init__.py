"""Inference: predictors, the model cache and the protocol routers."""
