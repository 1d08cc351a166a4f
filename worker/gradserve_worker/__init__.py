"""gradserve's worker: the truncated-BPTT trainer (trainer.py) and the Celery task that runs it."""
