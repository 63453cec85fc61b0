"""lattice.rendezvous: job-scoped membership in numbered rounds (see docs/rendezvous.md).

Clients: `lattice.rendezvous.client`; the service: `lattice.rendezvous.server.create_app`.
"""
