"""The relay ClientApp: hands a message's bytes to this node's party agent and returns what it answers.

Flower starts it afresh for every message. It holds nothing of the party (keys, data, model and logs stay
in the agent, ``feddat-secure site serve``) and imports nothing but the standard-library relay; whatever
fails is answered with an error code only, never with exception text.
"""

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from feddat_secure.deployment import relay

app = ClientApp()
RECORD = "feddat"


@app.query("feddat")
def forward(message: Message, context: Context) -> Message:
    try:
        socket_path = context.node_config["agent-socket"]
        record = message.content[RECORD]
        parts = relay.call(str(socket_path), str(record["kind"]).encode(), context.node_id,
                           [bytes(part) for part in record["requests"]], timeout_s=float(record["deadline_s"]))
        content = {"parts": parts} if parts else {}
    except relay.RelayError as error:
        content = {"error": error.code}
    except Exception:  # noqa: BLE001 - no exception text leaves the site
        content = {"error": "bad-request"}
    return Message(RecordDict({RECORD: ConfigRecord(content)}), reply_to=message)
