"""The synthetic heterogeneity benchmarks: deterministic, heterogeneous the way they claim."""

from __future__ import annotations

import numpy as np
import pytest

from feddat_secure.data.captions import describe
from feddat_secure.data.questions import FAMILIES, counting, existence, spatial
from feddat_secure.data.scenes import DOMAINS, SceneObject
from feddat_secure.data.synthetic import MATCH, MISMATCH, TASKS, SiteSpec, generate_examples, synthetic_benchmark
from feddat_secure.data.vqa import ClientData, DataError, VQAExample

SIZES = dict(num_clients=5, train_per_client=40, test_per_client=10, image_size=32)


@pytest.mark.parametrize("name", ["function", "domain", "scene", "task", "texture"])
def test_same_seed_gives_identical_data_and_another_seed_different_data(name):
    first = synthetic_benchmark(name, seed=0, **SIZES)
    assert first.digest() == synthetic_benchmark(name, seed=0, **SIZES).digest()
    assert first.digest() != synthetic_benchmark(name, seed=1, **SIZES).digest()
    assert len(first.clients) == 5


def test_adding_a_client_leaves_the_others_unchanged():
    five = synthetic_benchmark("function", seed=0, **SIZES)
    six = synthetic_benchmark("function", seed=0, **{**SIZES, "num_clients": 6})
    for a, b in zip(five.clients, six.clients):
        assert [e.question for e in a.train] == [e.question for e in b.train]


def test_function_benchmark_gives_each_client_its_own_question_family():
    bench = synthetic_benchmark("function", seed=0, **SIZES)
    starts = {"attribute": "what", "counting": "how many", "existence": "is there a", "spatial": "is the",
              "logical": "is there a"}
    for family, client in zip(FAMILIES, bench.clients):
        assert all(e.question.startswith(starts[family]) for e in client.train)
    logical = bench.clients[FAMILIES.index("logical")]
    assert all(" and a " in e.question or " or a " in e.question for e in logical.train)


def test_domain_benchmark_shifts_image_statistics_per_client():
    bench = synthetic_benchmark("domain", seed=0, **SIZES)
    means = [np.mean([e.image.mean() for e in c.train]) for c in bench.clients]
    inverted = DOMAINS.index("inverted")
    assert means[inverted] > 2 * max(m for i, m in enumerate(means) if i != inverted)


def test_scene_benchmark_gives_clients_disjoint_backgrounds():
    bench = synthetic_benchmark("scene", seed=0, **SIZES)
    corners = {tuple(c.train[0].image[0, 0]) for c in bench.clients}
    assert len(corners) >= 4


OBJECTS = [SceneObject("circle", "red", "large", 0, 0), SceneObject("square", "blue", "small", 1, 1)]


@pytest.mark.parametrize("seed", range(20))
def test_generated_answers_are_true_of_the_scene(seed):
    rng = np.random.default_rng(seed)
    colors, shapes = ("red", "blue", "green"), ("circle", "square")
    question, answer = existence(OBJECTS, rng, colors, shapes)
    present = any(question == f"is there a {o.name} ?" for o in OBJECTS)
    assert answer == ("yes" if present else "no")
    question, answer = counting(OBJECTS, rng, colors, shapes)
    if question == "how many objects are there ?":
        assert answer == "2"
    question, answer = spatial(OBJECTS, rng, colors, shapes)
    truth = {"is the red circle left of the blue square ?": "yes", "is the red circle above the blue square ?": "yes",
             "is the blue square left of the red circle ?": "no", "is the blue square above the red circle ?": "no"}
    if question in truth:
        assert answer == truth[question]


def test_every_generated_question_is_covered_by_the_tokenizer(foundation):
    unknown = foundation.tokenizer.unk_token_id
    for name in ("function", "domain", "scene", "task", "texture"):
        bench = synthetic_benchmark(name, seed=0, **SIZES)
        ids = foundation.tokenizer([e.question for c in bench.clients for e in c.train])["input_ids"]
        assert all(unknown not in row for row in ids)


def test_empty_splits_are_refused_with_the_client_named():
    example = VQAExample(np.zeros((4, 4, 3), np.uint8), "q ?", "yes")
    with pytest.raises(DataError, match="client 'site7': the test split is empty"):
        ClientData("site7", [example], [])


def test_task_benchmark_gives_each_client_one_task_with_its_own_text_and_label_space():
    bench = synthetic_benchmark("task", seed=0, families=("existence", "attribute", "counting"), **SIZES)
    tasks = [TASKS[index % len(TASKS)] for index in range(len(bench.clients))]
    assert tasks == ["vqa", "matching", "attributes", "vqa", "matching"]
    for task, client in zip(tasks, bench.clients):
        questions = {e.question for e in client.train + client.test}
        answers = {e.answer for e in client.train + client.test}
        assert answers <= set(client.answers)
        if task == "vqa":
            assert all(q.startswith(("is there a", "what", "how many")) for q in questions)
            assert {"match", "mismatch"}.isdisjoint(client.answers)
        elif task == "matching":
            assert client.answers == (MATCH, MISMATCH) and answers == {MATCH, MISMATCH}
            assert all(" at " in q and not q.endswith("?") for q in questions)
        else:
            assert questions == {"what shape objects are there ?", "what size objects are there ?"}
            assert "circle+square" in client.answers and "small+large" in client.answers
    vqa, matching, attributes = (set(client.answers) for client in bench.clients[:3])
    assert matching.isdisjoint(vqa | attributes)
    assert vqa & attributes == {"circle", "square", "triangle", "cross", "diamond", "small", "large"}  # one-value sets
    assert set(bench.answers) == vqa | matching | attributes


@pytest.mark.parametrize("seed", [*range(10), 66])  # 66: an easy negative that describes its scene by chance
def test_task_answers_are_true_of_the_scene(seed, monkeypatch):
    """A matching caption is labelled ``match`` exactly when every object it describes is in the scene; an
    attribute answer is the set of the scene's shapes or sizes."""
    from feddat_secure.data import synthetic

    scenes = []
    original = synthetic.sample_objects

    def recorded(rng, style):
        objects = original(rng, style)
        scenes.append(objects)
        return objects

    monkeypatch.setattr(synthetic, "sample_objects", recorded)
    for task in ("matching", "attributes"):
        scenes.clear()
        examples = generate_examples(SiteSpec(task=task), 50, 32, np.random.default_rng(seed))
        assert len(scenes) == len(examples)
        for objects, example in zip(scenes, examples):
            if task == "matching":
                true_of_scene = all(part in {describe(o) for o in objects} for part in example.question.split(" and "))
                assert (example.answer == MATCH) == true_of_scene
            else:
                attribute = "shape" if "shape" in example.question else "size"
                assert set(example.answer.split("+")) == {getattr(o, attribute) for o in objects}


def test_texture_benchmark_draws_each_site_on_its_own_natural_image_with_its_own_colours_and_question_mix():
    from collections import Counter

    from feddat_secure.data.scenes import COLORS
    from feddat_secure.data.synthetic import SITE_BUILDERS
    from feddat_secure.data.textures import TEXTURES, texture_image

    sizes = {**SIZES, "train_per_client": 300}
    families = ("existence", "attribute", "counting")
    bench = synthetic_benchmark("texture", seed=3, families=families, **sizes)
    specs = SITE_BUILDERS["texture"](5, families, 3)
    assert [spec.texture for spec in specs] == list(TEXTURES)
    for spec, client in zip(specs, bench.clients):
        assert len(spec.style.colors) == 4
        named = {word for e in client.train + client.test for word in e.question.split() + [e.answer]} & set(COLORS)
        assert named <= set(spec.style.colors)  # the site's own colours, in its questions and its answers
        assert set(client.answers) & set(COLORS) == set(spec.style.colors)
        asked = Counter("counting" if e.question.startswith("how many") else
                        "existence" if e.question.startswith("is there") else "attribute" for e in client.train)
        assert max(asked, key=asked.get) == families[int(np.argmax(spec.family_weights))]
        # no solid background (a scene alone has at most five colours): the texture shows where no object is
        assert all(len(np.unique(e.image.reshape(-1, 3), axis=0)) > 20 for e in client.train[:20])
        assert texture_image(spec.texture).ndim == 3
    assert len({tuple(spec.family_weights) for spec in specs}) == 5
    assert len({spec.style.colors for spec in specs}) > 1
    # the sites' draws depend on the seed and their index only: a sixth site leaves the five as they were
    assert SITE_BUILDERS["texture"](6, families, 3)[:5] == specs


def test_a_texture_replaces_only_the_background():
    from feddat_secure.data.textures import on_texture

    scene = np.zeros((4, 4, 3), np.uint8)
    scene[1, 2] = (220, 40, 40)
    texture = np.full((4, 4, 3), 77, np.uint8)
    combined = on_texture(scene, (0, 0, 0), texture)
    assert tuple(combined[1, 2]) == (220, 40, 40)
    assert (np.delete(combined.reshape(-1, 3), 6, axis=0) == 77).all()


def test_an_unknown_texture_is_refused_by_name():
    from feddat_secure.data.textures import texture_image

    with pytest.raises(ValueError, match="unknown texture 'marble'"):
        texture_image("marble")
