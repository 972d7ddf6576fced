"""authcore: the transaction authorisation core.

Layout: constants (limits, enums, records) → _kernel (Cython, decides
batches) → engine (clock, log, embedded API) → storage/wal/snapshot
(durability) → server + protocols (TCP) → client, cli.
"""

__version__ = "0.1.0"
