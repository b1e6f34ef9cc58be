"""A site: decodes the server's messages, trains or evaluates locally, answers in bytes.

After training, the site's update (the change of its travelling state) never goes to the
server directly: it becomes the input of the site's secure-aggregation session, after the
site's own client-level privacy step (clipping, local noise) when one is configured. The
``update`` message that answers a ``train`` message carries only the example count and losses.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from protocols.base import ClientSession

from ..data.batching import EncodedSplit
from ..model.adapters import save_peft_adapter
from ..training.trainers import LocalTrainer
from .messages import Message, MessageError, decode, encode
from .updates import StateLayout, update_vector

SERVER_ID = "server"

# Turns a raw update into (what the protocol adds up, integer noise for the masked protocol or None).
UpdatePrivacy = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray | None]]


class FederatedClient:
    def __init__(self, client_id: str, trainer: LocalTrainer, train: EncodedSplit, test: EncodedSplit, *,
                 batch_size: int, local_steps: int, seed: int, weight: int = 1,
                 aggregation: ClientSession | None = None, layout: StateLayout | None = None,
                 update_privacy: UpdatePrivacy | None = None) -> None:
        """``aggregation`` and ``layout`` are needed whenever this site sends updates."""
        self.client_id = client_id
        self.trainer = trainer
        self.train = train
        self.test = test
        self.batch_size = batch_size
        self.local_steps = local_steps
        self.rng = np.random.default_rng(seed)
        self.last_trained_round = -1
        self.weight = weight
        self.aggregation = aggregation
        self.layout = layout
        self.update_privacy = update_privacy

    def handle(self, data: bytes) -> bytes:
        """Answer one message from the server; a message that is not for us raises MessageError."""
        message = decode(data)
        if message.sender != SERVER_ID or message.recipient != self.client_id:
            raise MessageError(f"{self.client_id}: message from {message.sender!r} to {message.recipient!r} "
                               "is not for this client")
        if message.round < self.last_trained_round:
            raise MessageError(f"{self.client_id}: {message.kind!r} message for round {message.round} "
                               f"arrived after round {self.last_trained_round} (replay?)")
        if message.kind == "train":
            return self._train(message)
        if message.kind == "evaluate":
            return self._evaluate(message)
        raise MessageError(f"{self.client_id}: a client does not accept {message.kind!r} messages")

    def _train(self, message: Message) -> bytes:
        if message.round == self.last_trained_round:
            raise MessageError(f"{self.client_id}: round {message.round} was already trained (replay?)")
        send_update = bool(message.meta.get("send_update", True))
        if send_update and (not message.tensors or self.aggregation is None or self.layout is None):
            raise MessageError(f"{self.client_id}: asked for an update without a global state or an "
                               "aggregation session")
        if message.tensors:
            self.trainer.load_global(message.tensors)
        received = self.trainer.shared_state()
        losses = self.trainer.train_round_on(self.train, self.rng, message.round)
        self.last_trained_round = message.round
        if send_update:
            update = update_vector(self.layout, self.trainer.shared_state(), received)
            noise = None
            if self.update_privacy is not None:
                update, noise = self.update_privacy(update, self.rng)
            if noise is None:
                self.aggregation.set_input(message.round, update, self.weight)
            else:
                self.aggregation.set_input(message.round, update, self.weight, noise=noise)
        return encode(Message("update", message.round, self.client_id, SERVER_ID, {},
                              {"num_examples": len(self.train), **losses}))

    def _evaluate(self, message: Message) -> bytes:
        if message.tensors:
            self.trainer.load_global(message.tensors)
        metrics = self.trainer.evaluate(self.test)
        return encode(Message("metrics", message.round, self.client_id, SERVER_ID, {}, metrics))

    def save(self, folder: Path, base_model_path: Path) -> None:
        """Write what this site keeps: its adapters in PEFT format and, when local, its head."""
        adapters = self.trainer.model.adapters
        for name in self.trainer.kept:
            save_peft_adapter(adapters.get_state(name), adapters.settings, base_model_path,
                              folder / f"{name}_adapter")
        if not self.trainer.head_travels:
            save_file(self.trainer.model.head_state(), str(folder / "head.safetensors"))

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue this site exactly where it stopped."""
        return {"trainer": self.trainer.state_dict(), "rng": self.rng.bit_generator.state,
                "last_trained_round": self.last_trained_round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state["trainer"])
        self.rng.bit_generator.state = state["rng"]
        self.last_trained_round = int(state["last_trained_round"])
