"""The program runner for program-of-thought rationales: isolation levels and a warm worker pool."""
