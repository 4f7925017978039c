"""slipstream.worker: follows the application database's logical replication slot.

It owns the replication client and pgoutput decoder, mapping rows to IndexDocs, the
apply loop, and the `slipstream` command line.
"""
