"""Record-level DP under FedDAT: every parameter that sees data is trained by DP-SGD, per-sample
clipping really happens, each step changes the parameters by exactly what the optimizer says
(the Opacus + PEFT corruption trap), and ViLT's embeddings stay frozen."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from feddat_secure.config import RecordPrivacyConfig, TrainingConfig
from feddat_secure.data.batching import EncodedSplit
from feddat_secure.federation.algorithms import dp_steps_per_batch
from feddat_secure.privacy import PrivacyError, make_record_privacy
from feddat_secure.privacy.dp_sgd import PrivateOptimizer
from feddat_secure.training.local_model import LocalModel
from feddat_secure.training.losses import mkd_loss
from feddat_secure.training.trainers import (
    CLIENT,
    DUAL_ADAPTER_TEACHER,
    FROZEN_GLOBAL,
    SHARED,
    SHARED_ONLY,
    AdapterTrainer,
    FedDATTrainer,
    Schedule,
)

TRAINING = TrainingConfig(local_steps=2, batch_size=8, learning_rate=1e-2)


def feddat_model(foundation, lora, num_answers, seed=1) -> LocalModel:
    model = LocalModel(foundation, lora, (SHARED, FROZEN_GLOBAL, CLIENT), (SHARED, CLIENT), num_answers, seed=seed)
    with torch.no_grad():  # non-zero LoRA B, so every A and B matrix gets a gradient from the first step
        for name, p in model.classifier.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def privacy_for(split: EncodedSplit, *, batch_size: int, steps: int, noise: float, clip: float, algorithm="feddat"):
    config = RecordPrivacyConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=clip, reproducible=True)
    settings = make_record_privacy(config, dataset_size=len(split), batch_size=batch_size, local_steps=steps,
                                   rounds=3, steps_per_batch=dp_steps_per_batch(algorithm))
    return dataclasses.replace(settings, noise_multiplier=noise)  # σ = 0 only for the tests that need it


@pytest.fixture()
def six_records(tiny_split) -> EncodedSplit:
    return EncodedSplit(*(getattr(tiny_split, f)[:6] for f in ("pixel_values", "input_ids", "attention_mask",
                                                                "labels")))


class StepRecorder:
    """Every optimizer step: the parameters and gradients it started from, what it produced."""

    def __init__(self) -> None:
        self.steps = []

    def __enter__(self):
        def before(optimizer, args, kwargs):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self.steps.append({"optimizer": optimizer, "params": params,
                               "before": [p.detach().clone() for p in params],
                               "grads": [p.grad.detach().clone() for p in params],
                               "state": copy.deepcopy(optimizer.state_dict())})

        def after(optimizer, args, kwargs):
            self.steps[-1]["after"] = [p.detach().clone() for p in self.steps[-1]["params"]]

        self.handles = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def reference_step(record) -> list[torch.Tensor]:
    """The same optimizer, state and gradients on copies: what the step should have produced."""
    copies = [torch.nn.Parameter(b.clone()) for b in record["before"]]
    for p, g in zip(copies, record["grads"]):
        p.grad = g.clone()
    optimizer = type(record["optimizer"])(copies)
    optimizer.load_state_dict(record["state"])  # the learning rate, betas, decay and moments of the real one
    optimizer.step()
    return [p.detach() for p in copies]


def clipped_mean(gradients: list[list[torch.Tensor]], clip: float, denominator: float) -> list[torch.Tensor]:
    total = [torch.zeros_like(g) for g in gradients[0]]
    for sample in gradients:
        norm = torch.sqrt(sum((g**2).sum() for g in sample))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, sample):
            t += g * factor
    return [t / denominator for t in total]


def shared_step_gradients(model, split, cfg):
    """Each record's gradient for A_s and the head (step 2), one backward pass per record, without
    Opacus's hooks; also each record's A_s logits, the soft targets of step 3."""
    params = model.adapters.parameters(SHARED) + model.head_parameters()
    gradients, students = [], []
    for i in range(len(split)):
        batch = split.batch(torch.tensor([i]))
        with torch.no_grad():
            teacher = model.logits(batch, DUAL_ADAPTER_TEACHER)
        student = model.logits(batch, SHARED_ONLY)
        loss = mkd_loss(student, teacher, batch["labels"], temperature=cfg.temperature,
                        task_weight=cfg.task_weight, distill_weight=cfg.distill_weight)
        gradients.append(torch.autograd.grad(loss, params))
        students.append(student.detach())
    return gradients, students


def client_step_gradients(model, split, students, cfg):
    """Each record's gradient for A_c (step 3): the DAT learns from the A_s logits of step 2."""
    gradients = []
    for i in range(len(split)):
        batch = split.batch(torch.tensor([i]))
        loss = mkd_loss(model.logits(batch, DUAL_ADAPTER_TEACHER), students[i], batch["labels"],
                        temperature=cfg.temperature, task_weight=cfg.task_weight, distill_weight=cfg.distill_weight)
        gradients.append(torch.autograd.grad(loss, model.adapters.parameters(CLIENT)))
    return gradients


def test_every_parameter_that_sees_data_goes_through_dp_sgd_with_per_sample_clipping(foundation, lora,
                                                                                      tiny_benchmark, six_records):
    """q = 1 and σ = 0: the applied gradient of each optimizer must be the mean of the records'
    own gradients (computed one record at a time, without Opacus), each clipped to C."""
    model = feddat_model(foundation, lora, len(tiny_benchmark.answers))
    clip = 0.01  # below every record's gradient norm: clipping must act
    privacy = privacy_for(six_records, batch_size=6, steps=1, noise=0.0, clip=clip)
    assert privacy.sample_rate == 1.0
    schedule = Schedule(TrainingConfig(local_steps=1, batch_size=6, learning_rate=1e-2), rounds=3)
    reference = copy.deepcopy(model)
    trainer = FedDATTrainer(model, schedule, head_travels=False, privacy=privacy)
    trainable = {id(p) for p in model.classifier.parameters() if p.requires_grad}
    shared = model.adapters.parameters(SHARED) + model.head_parameters()
    client = model.adapters.parameters(CLIENT)
    assert trainable == {id(p) for p in shared + client}  # A_s, the head and A_c: nothing else
    shared_grads, students = shared_step_gradients(reference, six_records, schedule.training)
    with StepRecorder() as recorder:
        trainer.train_round_on(six_records, np.random.default_rng(0), 0)
    reference.set_head_state(model.head_state())  # step 3 runs after step 2 updated the head (as without DP)
    client_grads = client_step_gradients(reference, six_records, students, schedule.training)
    norms = [float(torch.sqrt(sum((g**2).sum() for g in sample))) for sample in shared_grads + client_grads]
    assert min(norms) > clip
    assert [len(s["params"]) for s in recorder.steps] == [len(shared), len(client)]
    expectations = (clipped_mean(shared_grads, clip, 6), clipped_mean(client_grads, clip, 6))
    for step, expected in zip(recorder.steps, expectations):
        applied_norm = math.sqrt(sum(float((g**2).sum()) for g in step["grads"]))
        assert applied_norm <= clip + 1e-6
        for applied, wanted in zip(step["grads"], expected):
            torch.testing.assert_close(applied, wanted, rtol=1e-3, atol=1e-7)
    assert trainer.round_events[0].noise_multiplier == 0.0


def test_each_private_step_changes_the_parameters_by_what_the_optimizer_says(foundation, lora, tiny_benchmark,
                                                                            tiny_split):
    """With noise and Poisson batches, over two rounds: every step of both optimizers moves every
    one of its parameters exactly as AdamW does from the privatized gradient, A_s, A_c and the
    head all move, and the frozen global adapter and the whole backbone (embeddings too) do not."""
    model = feddat_model(foundation, lora, len(tiny_benchmark.answers))
    privacy = privacy_for(tiny_split, batch_size=8, steps=2, noise=1.0, clip=1.0)
    trainer = FedDATTrainer(model, Schedule(TRAINING, rounds=3), head_travels=False, privacy=privacy)
    frozen = {n: p.detach().clone() for n, p in model.classifier.named_parameters() if not p.requires_grad}
    assert any(".embeddings." in n for n in frozen)
    rng = np.random.default_rng(3)
    with StepRecorder() as recorder:
        for round_index in range(2):
            trainer.train_round_on(tiny_split, rng, round_index)
    assert len(recorder.steps) == 2 * 2 * 2  # rounds × batches × (A_s with head, A_c)
    for step in recorder.steps:
        for after, wanted, before in zip(step["after"], reference_step(step), step["before"]):
            torch.testing.assert_close(after, wanted, rtol=1e-5, atol=1e-8)
            assert not torch.equal(after, before)  # noise alone moves every parameter
    for name, p in model.classifier.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert trainer.round_events[0].noise_multiplier == pytest.approx(1.0 / math.sqrt(2))


def test_private_training_reports_no_losses_and_accounts_two_steps_per_batch(foundation, lora, tiny_benchmark,
                                                                            tiny_split):
    model = feddat_model(foundation, lora, len(tiny_benchmark.answers))
    privacy = privacy_for(tiny_split, batch_size=8, steps=2, noise=1.2, clip=1.0)
    trainer = FedDATTrainer(model, Schedule(TRAINING, rounds=3), head_travels=False, privacy=privacy)
    assert trainer.train_round_on(tiny_split, np.random.default_rng(0), 0) == {}
    (event,) = trainer.round_events
    assert (event.noise_multiplier, event.sample_rate, event.steps) == (1.2 / math.sqrt(2), 8 / 32, 2)


def test_fedavg_trainer_runs_dp_sgd_on_its_adapter_and_head(foundation, lora, tiny_benchmark, tiny_split):
    model = LocalModel(foundation, lora, (SHARED,), (SHARED,), len(tiny_benchmark.answers), seed=2)
    privacy = privacy_for(tiny_split, batch_size=8, steps=2, noise=1.0, clip=1.0, algorithm="fedprox")
    trainer = AdapterTrainer(model, Schedule(TRAINING, rounds=3), head_travels=True, proximal_mu=0.1,
                             privacy=privacy)
    with StepRecorder() as recorder:
        trainer.train_round_on(tiny_split, np.random.default_rng(1), 0)
    assert len(recorder.steps) == 2
    for step in recorder.steps:
        for after, wanted in zip(step["after"], reference_step(step)):
            torch.testing.assert_close(after, wanted, rtol=1e-5, atol=1e-8)
    assert trainer.round_events[0].noise_multiplier == 1.0  # one DP-SGD step per batch


def test_trainable_embeddings_are_refused_under_dp(foundation, lora, tiny_benchmark, tiny_split):
    model = feddat_model(foundation, lora, len(tiny_benchmark.answers))
    embedding = next(p for n, p in model.classifier.named_parameters() if "position_embeddings" in n)
    embedding.requires_grad_(True)
    privacy = privacy_for(tiny_split, batch_size=8, steps=1, noise=1.0, clip=1.0)
    with pytest.raises(PrivacyError, match="embeddings"):
        FedDATTrainer(model, Schedule(TRAINING, rounds=3), head_travels=False, privacy=privacy)


def test_a_trainable_parameter_outside_every_private_optimizer_is_refused(foundation, lora, tiny_benchmark,
                                                                          tiny_split):
    model = LocalModel(foundation, lora, (SHARED, CLIENT), (SHARED, CLIENT), len(tiny_benchmark.answers), seed=2)
    privacy = privacy_for(tiny_split, batch_size=8, steps=1, noise=1.0, clip=1.0, algorithm="fedavg")
    with pytest.raises(PrivacyError, match="without DP"):  # A_c trainable, but fedavg only privatizes A_s + head
        AdapterTrainer(model, Schedule(TRAINING, rounds=3), head_travels=False, privacy=privacy)


def test_noise_of_a_private_step_has_the_configured_standard_deviation():
    layer = torch.nn.Linear(200, 100)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    private = PrivateOptimizer(optimizer, noise_multiplier=1.3, max_grad_norm=0.7, expected_batch_size=4.0,
                               generator=torch.Generator().manual_seed(0))
    private.privatize(0)  # an empty Poisson batch: the release is noise only
    noise = torch.cat([p.grad.flatten() for p in private.parameters]) * 4.0
    n = noise.numel()
    std = float(noise.std())
    # 99.9% interval of the sample std of n normal draws: σ(1 ± 3.3/√(2n))
    assert abs(std / (1.3 * 0.7) - 1) < 3.3 / math.sqrt(2 * n)
    assert abs(float(noise.mean())) < 3.3 * 1.3 * 0.7 / math.sqrt(n)


def test_a_missing_per_sample_gradient_is_an_error_not_a_silent_zero():
    layer = torch.nn.Linear(4, 2)
    private = PrivateOptimizer(torch.optim.SGD(layer.parameters(), lr=1.0), noise_multiplier=1.0,
                               max_grad_norm=1.0, expected_batch_size=2.0, generator=torch.Generator())
    for p in layer.parameters():
        p.grad_sample = None
    with pytest.raises(PrivacyError, match="no per-sample gradient"):
        private.privatize(3)
    layer.weight.grad_sample = torch.zeros(2, 2, 4)
    layer.bias.grad_sample = torch.zeros(3, 2)
    with pytest.raises(PrivacyError, match="shape"):
        private.privatize(3)


def test_poisson_batches_include_each_record_independently(tiny_split):
    rng = np.random.default_rng(0)
    sizes = [len(b["labels"]) for b in tiny_split.poisson_batches(0.25, 400, rng)]
    assert np.mean(sizes) == pytest.approx(0.25 * len(tiny_split), rel=0.05)
    assert len(set(sizes)) > 5  # sizes vary, unlike fixed-size batches
    assert any(len(b["labels"]) == 0 for b in tiny_split.poisson_batches(0.02, 50, rng))


def test_non_private_rounds_are_unchanged_by_the_new_entry_point(foundation, lora, tiny_benchmark, tiny_split):
    """train_round_on without DP is exactly train_round on the old seeded mini-batches."""
    results = []
    for use_entry_point in (True, False):
        torch.manual_seed(0)
        model = feddat_model(foundation, lora, len(tiny_benchmark.answers))
        trainer = FedDATTrainer(model, Schedule(TRAINING, rounds=3), head_travels=False)
        rng = np.random.default_rng(5)
        if use_entry_point:
            losses = trainer.train_round_on(tiny_split, rng, 0)
        else:
            losses = trainer.train_round(tiny_split.sample_batches(TRAINING.batch_size, TRAINING.local_steps, rng), 0)
        results.append((losses, model.adapters.get_state(SHARED)))
    assert results[0][0] == results[1][0]
    for key, value in results[0][1].items():
        np.testing.assert_array_equal(value, results[1][1][key])
