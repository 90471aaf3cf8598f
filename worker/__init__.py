"""The Celery worker: ``celery_app`` (configuration and task registration), ``tasks`` (thin: job id → runner),
``runner`` (the job lifecycle: claim, train, save, record, with progress, heartbeats and cancellation)."""
