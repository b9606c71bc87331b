"""Pictures of a memory: the plots (`plots`) and the cache that renders them in a worker process (`cache`)."""
