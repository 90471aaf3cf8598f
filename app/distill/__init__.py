"""The distillation core: job spec → models, data, losses, training loop, evaluation, export.

Plain PyTorch (plus pydantic for the spec's shape): no web, database or queue imports. An import-linter contract in
pyproject.toml keeps it that way, so everything here runs and tests on a laptop CPU in milliseconds.
"""
