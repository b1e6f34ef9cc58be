"""feddat-secure's Flower app: ``server_app`` runs the server role, ``client_app`` relays to a party's agent."""
