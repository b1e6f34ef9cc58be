"""Red-team review of issue 10's hardening: attacks played through the package's own parties and signed messages.

A test marked ``xfail(strict=True)`` is a break that still works (the lead removes the mark once it is fixed); the
other tests are attacks that the defence already stops and that no other test plays."""

from __future__ import annotations

import pytest
from conftest import simulated_federation, small_config
from test_protocols_masked_adversarial import Harness

from feddat_secure.federation import envelopes as E
from feddat_secure.federation.server_app import RoundLog
from protocols import MessageRejected, Outgoing
from protocols.masked.stages import CONSISTENCY, UNMASK
from protocols.wire import peek

# ------------------------------------------------------------------ federation: a malicious site's signed replies


def _metrics_without_the_field(honest: dict) -> dict:
    return {}


def _metrics_that_are_not_numbers(honest: dict) -> dict:
    return {"metrics": {mode: "not a number" for mode in honest["metrics"]}}


def _a_tree_head_that_does_not_verify(honest: dict) -> dict:
    return {"tree_head": "garbage"}


MALICIOUS_REPLIES = {  # case → (the runner stage whose reply the site forges, the fields it signs instead)
    "an evaluate reply without 'metrics'": (E.EVALUATE, _metrics_without_the_field),
    "an evaluate reply whose metrics are strings": (E.EVALUATE, _metrics_that_are_not_numbers),
    "a tree-head reply that does not verify": (E.TREE_HEAD, _a_tree_head_that_does_not_verify),
    "a closing reply whose tree head does not verify": (E.CLOSE, _a_tree_head_that_does_not_verify),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", MALICIOUS_REPLIES)
def test_a_malicious_sites_signed_runner_reply_cannot_crash_the_run(foundation, tmp_path, case):
    """client1 answers every request honestly except one reply, which it signs with its own key with fields the
    server does not expect. Issue 10 item 6: a malicious site may deny service, never crash the runner."""
    stage, forge = MALICIOUS_REPLIES[case]
    config = small_config(tmp_path, secure_aggregation={"protocol": "plain"}, training={"local_steps": 1},
                          federation={"rounds": 1, "aggregation": "uniform"}, data={"test_per_client": 8})
    federation = simulated_federation(config, foundation)
    served, site = federation.channel.endpoints["client1"], federation.sites["client1"]

    class Malicious:
        party_id = "client1"

        def handle(self, data: bytes) -> list[Outgoing]:
            answers = served.handle(data)
            request = peek(data)
            if request.stage != stage or not answers:
                return answers
            honest = dict(peek(answers[0].data).fields)
            reply = site.stamp.envelope(E.REPLY_TO[stage], request.round, "server", forge(honest))
            return [Outgoing("server", reply)]

    federation.channel.endpoints["client1"] = Malicious()
    server = federation.server
    server.run(RoundLog(write=lambda record: record, echo=lambda line: None))
    heads = server.close()
    [record] = server.history
    assert record["trained"] == ["client0", "client1", "client2"]
    assert {"client0", "client2"} <= set(record["clients"])
    assert heads["client0"] is not None


# ------------------------------------------------------- masked: a split survivor view, one colluder signing both


def test_a_split_survivor_view_with_a_colluder_signing_both_sets_reveals_no_mask_key_of_a_survivor():
    """The victim client-0 sent its masked input. The server tells client-0, 1 and 2 "everyone survived" (A) and
    client-3 "client-0 dropped" (B); the colluder client-4 signs both sets. From A's side it collects client-0's
    self-mask shares (legitimately), from B's side it needs t = 3 mask-key shares of client-0, but client-3 sees
    only the colluder's signature on B among its neighbours and refuses: the best split of n = 5 against one
    colluder leaves the victim's mask key out of reach (Bonawitz et al. 2017, §4 consistency check)."""
    h = Harness(n=5)
    for _ in range(4):
        h.stage()
    everyone = [f"client-{i}" for i in range(5)]
    without_victim = everyone[1:]
    views = {"client-0": everyone, "client-1": everyone, "client-2": everyone, "client-3": without_victim}
    signatures = {name: {} for name in ("A", "B")}
    for name, survivors in views.items():
        answer = h.clients[name].handle(h.forge("server", name, CONSISTENCY, {"survivors": survivors}))[0].data
        signatures["A" if survivors == everyone else "B"][name] = answer
    signed = dict(h.read(signatures["A"]["client-1"]).fields)
    for name, survivors in (("A", everyone), ("B", without_victim)):  # the colluder signs whatever it is shown
        signatures[name]["client-4"] = h.forge("client-4", "server", CONSISTENCY, {**signed, "survivors": survivors})
    # A's side: client-1 sees client-0, client-2 and the colluder sign A, and reveals client-0's self-mask share
    answer = h.read(h.clients["client-1"].handle(h.forge("server", "client-1", UNMASK,
                                                         {"self_mask_of": ["client-0"], "mask_key_of": []},
                                                         blobs={peer: data for peer, data in signatures["A"].items()
                                                                if peer != "client-1"}))[0].data)
    assert list(answer.blobs) == ["self_mask/client-0"]
    # B's side: client-3's neighbours that signed B are the colluder alone
    with pytest.raises(MessageRejected, match="fewer than the threshold 3"):
        h.clients["client-3"].handle(h.forge("server", "client-3", UNMASK,
                                             {"self_mask_of": [], "mask_key_of": ["client-0"]},
                                             blobs={"client-4": signatures["B"]["client-4"]}))
    # nor can it pass A's signatures off as B's: they name another survivor set
    with pytest.raises(MessageRejected, match="different survivor set"):
        h.clients["client-3"].handle(h.forge("server", "client-3", UNMASK,
                                             {"self_mask_of": [], "mask_key_of": ["client-0"]},
                                             blobs={"client-4": signatures["B"]["client-4"],
                                                    "client-1": signatures["A"]["client-1"],
                                                    "client-2": signatures["A"]["client-2"]}))
