"""The in-memory backend: tasks, schedule and results live in this process."""
