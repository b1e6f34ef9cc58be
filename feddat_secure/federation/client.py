"""A site: decodes the server's messages, trains or evaluates locally, answers in bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..data.batching import EncodedSplit
from ..model.adapters import save_peft_adapter
from ..training.trainers import LocalTrainer
from .messages import Message, MessageError, decode, encode

SERVER_ID = "server"


class FederatedClient:
    def __init__(self, client_id: str, trainer: LocalTrainer, train: EncodedSplit, test: EncodedSplit, *,
                 batch_size: int, local_steps: int, seed: int) -> None:
        self.client_id = client_id
        self.trainer = trainer
        self.train = train
        self.test = test
        self.batch_size = batch_size
        self.local_steps = local_steps
        self.rng = np.random.default_rng(seed)
        self.last_trained_round = -1

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
        if message.tensors:
            self.trainer.load_global(message.tensors)
        batches = self.train.sample_batches(self.batch_size, self.local_steps, self.rng)
        losses = self.trainer.train_round(batches, message.round)
        self.last_trained_round = message.round
        send_update = bool(message.meta.get("send_update", True))
        tensors = self.trainer.shared_state() if send_update else {}
        return encode(Message("update", message.round, self.client_id, SERVER_ID, tensors,
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
