"""The MKD loss terms against a hand computation, and one schedule for every method."""

from __future__ import annotations

import math

import numpy as np
import torch

from feddat_secure.config import TrainingConfig
from feddat_secure.training.local_model import LocalModel
from feddat_secure.training.losses import distillation_kl, mkd_loss
from feddat_secure.training.schedule import learning_rate
from feddat_secure.training.trainers import CLIENT, FROZEN_GLOBAL, SHARED, AdapterTrainer, FedDATTrainer, Schedule

STUDENT = [[2.0, 0.5, -1.0]]
TEACHER = [[0.0, 1.0, 3.0]]


def softmax(values, temperature):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def test_distillation_term_is_t_squared_kl_of_teacher_to_student_by_hand():
    t = 3.0
    p, q = softmax(TEACHER[0], t), softmax(STUDENT[0], t)
    by_hand = t**2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    value = distillation_kl(torch.tensor(STUDENT), torch.tensor(TEACHER), t)
    assert math.isclose(value.item(), by_hand, rel_tol=1e-5)


def test_mkd_loss_is_half_task_plus_half_distillation_by_hand():
    t, label = 3.0, 1
    exps = [math.exp(v) for v in STUDENT[0]]
    cross_entropy = -math.log(exps[label] / sum(exps))
    p, q = softmax(TEACHER[0], t), softmax(STUDENT[0], t)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    value = mkd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor([label]), temperature=t,
                     task_weight=0.5, distill_weight=0.5)
    assert math.isclose(value.item(), 0.5 * cross_entropy + 0.5 * t**2 * kl, rel_tol=1e-5)


def test_distillation_gradient_reaches_only_the_student():
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    mkd_loss(student, teacher.detach(), torch.tensor([0]), temperature=3.0, task_weight=0.5,
             distill_weight=0.5).backward()
    assert student.grad is not None and teacher.grad is None


def test_linear_schedule_depends_only_on_round_and_step():
    kwargs = dict(rounds=4, steps_per_round=10)
    assert learning_rate(1.0, "linear", round_index=0, step=0, **kwargs) == 1.0
    assert learning_rate(1.0, "linear", round_index=2, step=0, **kwargs) == 0.5
    assert learning_rate(1.0, "constant", round_index=3, step=9, **kwargs) == 1.0


def test_feddat_and_fedavg_follow_the_same_learning_rate_schedule(foundation, lora, tiny_benchmark, tiny_split):
    """The official code stepped FedDAT's scheduler twice per batch; here both see one schedule."""
    training = TrainingConfig(local_steps=3, batch_size=8, schedule="linear", learning_rate=0.01)
    schedule = Schedule(training, rounds=4)
    answers = len(tiny_benchmark.answers)
    feddat = FedDATTrainer(LocalModel(foundation, lora, (SHARED, FROZEN_GLOBAL, CLIENT), (SHARED, CLIENT),
                                      answers, seed=0), schedule, head_travels=False)
    fedavg = AdapterTrainer(LocalModel(foundation, lora, (SHARED,), (SHARED,), answers, seed=0), schedule,
                            head_travels=False, keep_optimizer=True)
    rng = np.random.default_rng(0)
    for round_index in range(2):
        feddat.train_round(tiny_split.sample_batches(8, 3, rng), round_index)
        fedavg.train_round(tiny_split.sample_batches(8, 3, rng), round_index)
        expected = schedule.rate(round_index, 2)
        assert feddat.client_optimizer.param_groups[0]["lr"] == expected
        assert fedavg._persistent.param_groups[0]["lr"] == expected
