"""The names of FedDAT's adapters (torch-free, so registries and configuration can use them cheaply)."""

SHARED = "shared"  # A_s: trained locally, the only adapter that leaves the site
FROZEN_GLOBAL = "global_frozen"  # Â_s: the received global adapter, frozen, half of the teacher
CLIENT = "client"  # A_c: the personal adapter, trained locally, never leaves the site, kept across rounds
