"""Parameter-server training over ZeroMQ (``parallel.sync = "ps"``).

Modules: ``protocol`` (wire format, HMAC), ``wire`` (gradient codecs per key), ``placement``
(keys and their servers), ``consistency`` (BSP / ASP / SSP bookkeeping), ``shard`` (a server's
parameters and optimizer), ``server`` (the server process), ``client`` (the worker's sockets),
``worker`` (push / pull / recovery on the model), ``strategy`` (the gradient sync, PSSync) and
``launch`` (local servers + workers, roles under torchrun).  See docs/parameter-server.md.

Nothing is imported here, so a server process loads only what it uses.
"""
