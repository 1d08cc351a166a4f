"""gradserve's gRPC server: validates jobs, records them in Redis, queues them for workers and relays their events."""
