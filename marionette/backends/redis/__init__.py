"""The Redis backend; imported only when Config.backend names Redis (it needs redis-py)."""
