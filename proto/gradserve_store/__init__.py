"""The contract between gradserve's server and its workers: the Redis layout, its scripts, and the Celery task names."""
