"""The engine: scheduling, KV-cache blocks, the paged cache, running and sampling."""
