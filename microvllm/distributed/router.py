"""Router: which replica runs a request.

Prefix affinity first: a request whose prompt starts with the same first full block(s)
as an earlier one goes to a replica that already holds that prefix, so its KV blocks
come from that replica's prefix cache. Load second: a prefix stays with its replicas
until the least loaded of them has more than `spill_tokens` more outstanding work than
the least loaded replica; then it spreads to that replica too, because one more prefill
of the prefix is cheap next to a replica standing idle. Load is outstanding tokens
(prompt plus the tokens still allowed to generate), not a request count: one long
request weighs as much as many short ones.
"""

DEFAULT_SPILL_TOKENS = 2048


class Router:
    def __init__(self, num_replicas: int, block_size: int, prefix_blocks: int = 1,
                 spill_tokens: int = DEFAULT_SPILL_TOKENS):
        self.block_size = block_size
        self.prefix_blocks = prefix_blocks
        self.spill_tokens = spill_tokens
        self.load = [0] * num_replicas         # outstanding tokens per replica
        self.alive = [True] * num_replicas
        self.prefix_owners: dict[int, set[int]] = {}  # prefix key -> live replicas holding it

    def route(self, prompt_token_ids: list[int], cost: int) -> int:
        """The replica for a request of `cost` outstanding tokens; its load grows by that."""
        least = min((i for i, alive in enumerate(self.alive) if alive), key=self.load.__getitem__)
        choice = least
        key = self.prefix_key(prompt_token_ids)
        if key is not None:
            owners = self.prefix_owners.setdefault(key, set())
            owner = min(sorted(owners), key=self.load.__getitem__, default=None)
            if owner is not None and self.load[owner] - self.load[least] <= self.spill_tokens:
                choice = owner
            owners.add(choice)
        self.load[choice] += cost
        return choice

    def finish(self, replica: int, cost: int) -> None:
        self.load[replica] -= cost

    def remove(self, replica: int) -> None:
        """A replica is gone: route nothing more to it, and forget the prefixes it held."""
        self.alive[replica] = False
        self.load[replica] = 0
        for owners in self.prefix_owners.values():
            owners.discard(replica)

    def prefix_key(self, prompt_token_ids: list[int]) -> int | None:
        """A hash of the first full block(s), or None for a prompt too short to cache them.

        A collision only routes a request to a replica without its prefix: no harm done."""
        n = self.block_size * self.prefix_blocks
        # the engine recomputes the last prompt token, so only blocks before it can hit the cache
        return hash(tuple(prompt_token_ids[:n])) if len(prompt_token_ids) > n else None
