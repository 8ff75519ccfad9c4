"""THE trainer over Accelerate, its optimizers and its checkpoints."""
