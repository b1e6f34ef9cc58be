"""The ServerApp: the server role of feddat-secure, holding only the server's own folder (``server-dir``)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from feddat_secure.deployment.server_role import ServerRoleSettings, run_server_role

    run_server_role(grid, ServerRoleSettings.from_run_config(dict(context.run_config)))
