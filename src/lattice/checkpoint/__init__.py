"""lattice.checkpoint: durable checkpoint storage with atomic commits and checksums.

`storage` holds the commit protocol over fsspec, `server` the HTTP service, `client` what the
addon and the CLI use. The service stores opaque bytes: nothing it receives is unpickled.
"""
