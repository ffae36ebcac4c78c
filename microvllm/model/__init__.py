"""The nanochat GPT: configuration and eras, forward, attention backends, loading."""
