"""The Flower wiring of a federation: each party in its own process, on its own machine (docs/deployment.md).

- :mod:`.party_dir` — a party's own folder and the agreement every party holds (configuration, federation facts);
- :mod:`.agent` — a site's or the key holder's long-lived agent (``feddat-secure site serve``);
- :mod:`.relay` — the standard-library hop from the relay ClientApp to the agent, and its error codes;
- :mod:`.binding` — which Flower node runs which roster party, proven by a signature;
- :mod:`.grid_channel` — the server's channel over Flower's ServerApp ``Grid``;
- :mod:`.server_role` — what the ServerApp (``deploy/flower``) runs;
- :mod:`.local` — ``feddat-secure deploy local``; :mod:`.tls` — certificates and node keys for it.

Importing this package loads nothing: the relay ClientApp imports :mod:`.relay` alone.
"""
