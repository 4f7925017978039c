"""slipstream.shardsync: the change log reader, shard export, delta sync, sync server and client."""
