"""Where waiting work lives: in this process's memory, or in Redis, shared by a cluster."""
