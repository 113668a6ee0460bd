"""Media shards: processes that own peer connections (see shard.py); the front starts and supervises them."""
