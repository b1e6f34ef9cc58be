"""Tamper-evident audit logs of every exchange, and their verifier.

A package of its own (standard library and ``cryptography``); it never imports torch or
``feddat_secure``. The log lands with the audit issue; the federation runner already moves
every exchange as canonical bytes (``feddat_secure.federation.messages``), which is what
the log will hash.
"""
