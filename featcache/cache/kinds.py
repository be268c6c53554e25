"""The token kinds a cache holds, defined once for extraction, the cache, the probe and
the report (docs/cache-format.md)."""

FEATURE_KINDS = ("cls", "ap")  # per layer
POOL_KIND = "pool"  # the final layer's pooled embedding, where the model has its own
TOKEN_KIND = "last_tokens"  # every token of the last layer (`extract --all-tokens`)
