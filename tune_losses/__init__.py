"""tune-losses: memory-efficient losses for large-vocabulary language models."""
